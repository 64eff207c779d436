"""Benchmark the HTTP API (`esp api`) against the model server's raw batched throughput, in one run.

Setup, all on this machine: `esp serve` with the default model (models/bert, `make model`) pinned
with taskset to --server-cores; `esp api` pinned to --api-cores; the load from Debian's `wrk` (a
compiled load generator, pinned beside the API, so the client costs little of the CPU measured),
N concurrent connections each sending single-comment POST /v1/score requests, as the users of
ESP's original Flask client did. Texts are the shipped Jigsaw comments in their natural length mix,
a different one per request (bench/api_post.lua). Measured:

1. raw: the model server's own batched throughput on the same texts (batches of --batch-size,
   --batches-in-flight concurrent clients; bench/bench_serving.py's load generator);
2. the API at full load (N connections, no pause): requests/s, share of raw (target >= 70%), the
   API's CPU per request (target <= 0.4 ms) and the mean batch the engine formed;
3. the naive gateway: the same API with batching off (one Predict per request, like the original
   client): requests/s, and how many times the batched API does (target >= 2.5x);
4. latency at half of (2)'s throughput (wrk paces each connection with random exponential gaps):
   p50, p90, p99 (target p99 <= 150 ms);
5. the ceilings of (2) and (3), the model server alone: batches cut from the texts sorted by length
   (the least padding any batcher can reach; the best of batch sizes 8 to 64; bench/bench_serving.py's
   load generator), and one comment per Predict with --naive-in-flight clients. Their ratio bounds what batching can buy
   over the naive gateway on this model and machine, whatever the API does.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_api.py --json docs/figures/api-bench.json --chart docs/figures/api-throughput.png
    .venv/bin/python bench/bench_api.py --test-model --duration-s 5     # quick check with the tiny test model

Figures are comparable only within one run; docs/api.md records a run and its command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from bench_serving import load_texts, run_load  # noqa: E402
from bench_worker import PinnedModelServer, choose_model, cpu_seconds  # noqa: E402

from api.local import ApiProcess  # noqa: E402
from esp.batcher import length_sorted_batches  # noqa: E402
from esp.settings import BatchingSettings, ModelClientSettings  # noqa: E402
from esp.settings.batching import API_BATCH_SIZE  # noqa: E402
from esp.settings.api import ApiSettings  # noqa: E402

log = logging.getLogger("bench_api")
LUA = REPO_ROOT / "bench" / "api_post.lua"
SORTED_SIZES = (8, 16, 32, 64)  # batch sizes tried for the ceiling
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(url: str, *, connections: int, duration_s: float, cores: str, bodies: Path, mean_gap_ms: float = 0.0) -> dict:
    """Runs wrk with the POST script; returns requests, requests/s, latency percentiles (ms), errors."""
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is missing: `make install` installs Debian's wrk (system-packages.txt)")
    env = {**os.environ, "ESP_BENCH_BODIES": str(bodies), "ESP_BENCH_MEAN_GAP_MS": str(mean_gap_ms)}
    cmd = ["taskset", "-c", cores, exe, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "--timeout", "10s", "-s", str(LUA), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + 60)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    text = out.stdout
    requests = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    result: dict[str, Any] = {"requests": requests, "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    result["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    result["socket_errors"] = socket_errors.group(1).strip() if socket_errors else ""
    return result


def start_api(
    server_target: str, batching: BatchingSettings, *, cores: str, log_path: Path, source_tree: Path | None = None
) -> ApiProcess:
    """`esp api` pinned to `cores`, set up for measuring (queue and deadline out of the way, no
    access log); from `source_tree` instead of this checkout when given (bench_api_cpu.py)."""
    env = {"ESP_LOG_LEVEL": "WARNING"}
    if source_tree is not None:
        env["PYTHONPATH"] = str(source_tree)
    api = ApiProcess(
        ModelClientSettings(model_server=server_target, model_timeout_s=30.0),
        batching,
        ApiSettings(api_max_queued=4096, api_request_deadline_s=10.0, api_access_log=False),
        env=env,
        log_path=log_path,
        wrapper=["taskset", "-c", cores],
        start_timeout_s=120,
        cwd=source_tree,  # `python -m` imports from its working directory first
    )
    api.start()
    return api


def measure_api(
    label: str, server_target: str, batching: BatchingSettings, args: argparse.Namespace, bodies: Path, log_dir: Path,
    *, target_rate: float | None = None,
) -> dict:
    """Starts `esp api` pinned to --api-cores, warms it, runs wrk, reads CPU and batch sizes.

    With `target_rate` (requests/s), each connection pauses between requests; the pause is
    calibrated in a short run first (a connection's cycle is its pause plus the answer's latency).
    """
    api = start_api(server_target, batching, cores=args.api_cores, log_path=log_dir / f"api-{label}.log")
    try:
        url = api.base_url + "/v1/score"
        mean_gap_ms = 0.0
        if target_rate is not None:
            mean_gap_ms = 1000.0 * args.connections / target_rate
            probe = wrk(url, connections=args.connections, duration_s=3, cores=args.api_cores, bodies=bodies, mean_gap_ms=mean_gap_ms)
            cycle_ms = 1000.0 * args.connections / probe["requests_per_s"]
            mean_gap_ms = max(0.0, mean_gap_ms - (cycle_ms - mean_gap_ms))
        wrk(url, connections=args.connections, duration_s=2, cores=args.api_cores, bodies=bodies, mean_gap_ms=mean_gap_ms)  # warm-up
        count0, sum0 = api.metric("esp_batch_size_count"), api.metric("esp_batch_size_sum")
        cpu0 = cpu_seconds(api.pid)
        result = wrk(url, connections=args.connections, duration_s=args.duration_s, cores=args.api_cores, bodies=bodies, mean_gap_ms=mean_gap_ms)
        cpu = cpu_seconds(api.pid) - cpu0
        batches = api.metric("esp_batch_size_count") - count0
        comments = api.metric("esp_batch_size_sum") - sum0
    finally:
        api.stop(timeout_s=30)
    result.update(
        label=label,
        api_cpu_ms_per_request=1000 * cpu / max(1, result["requests"]),
        mean_batch_size=comments / batches if batches else float("nan"),
        connections=args.connections,
        mean_gap_ms=mean_gap_ms,
    )
    log.warning("%s: %.0f req/s, p50 %.1f ms, p99 %.1f ms, API CPU %.3f ms/request, mean batch %.1f, non-2xx %d",
                label, result["requests_per_s"], result["p50_ms"], result["p99_ms"], result["api_cpu_ms_per_request"],
                result["mean_batch_size"], result["non_2xx"])
    return result


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        (f"model server raw\nbatch {results['batch_size']}", results["raw"]["sequences_per_s"], "#777"),
        (f"API, batched\n{results['connections']} clients", results["batched"]["requests_per_s"], "#1f77b4"),
        ("API, naive\n1 Predict/request", results["naive"]["requests_per_s"], "#d62728"),
        ("server alone,\nsorted batches", results["sorted"]["sequences_per_s"], "#bbb"),
        ("server alone,\n1 per Predict", results["single"]["sequences_per_s"], "#f4a6a6"),
    ]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [4, 2]})
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, v, _) in enumerate(bars):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("comments / s")
    ax.set_title("Throughput, single-comment requests")
    half = results["half_load"]
    ax2.bar(["p50", "p90", "p99"], [half["p50_ms"], half["p90_ms"], half["p99_ms"]], color="#1f77b4")
    ax2.axhline(150, color="#d62728", linestyle="--", label="target p99 150 ms")
    for i, v in enumerate([half["p50_ms"], half["p90_ms"], half["p99_ms"]]):
        ax2.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax2.set_ylabel("ms")
    ax2.set_title(f"Latency at {half['requests_per_s']:.0f} req/s (half load)")
    ax2.legend(loc="upper left")
    load = results.get("load_average_at_start", [float("nan")])[0]
    fig.suptitle(f"ESP HTTP API ({results['model']}), shared 2-core machine, load average {load:.1f} at the start")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model base path (default: models/bert, the default model)")
    parser.add_argument("--test-model", action="store_true", help="use the tiny test model (tests/fixtures/models.py)")
    parser.add_argument("--batch-size", type=int, default=API_BATCH_SIZE, help="the API's batch size (default: esp api's)")
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--max-batch-latency-ms", type=float, default=20.0)
    parser.add_argument("--naive-in-flight", type=int, default=4, help="Predict calls the naive gateway may have open at once")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (wrk connections)")
    parser.add_argument("--server-cores", default="1", help="taskset core list for the model server")
    parser.add_argument("--api-cores", default="0", help="taskset core list for the API and wrk")
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of raw, batched and naive; the best of each counts")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    scratch = tempfile.TemporaryDirectory(prefix="esp-bench-api-")
    log_dir = Path(scratch.name)
    base, model_desc = choose_model(args.model, test_model=args.test_model, scratch=log_dir)
    texts = load_texts(4096)
    bodies = log_dir / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    results: dict[str, Any] = {
        "model": model_desc, "batch_size": args.batch_size, "batches_in_flight": args.batches_in_flight,
        "connections": args.connections, "server_cores": args.server_cores, "api_cores": args.api_cores,
        "duration_s": args.duration_s, "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
    }
    print(f"model: {model_desc}; model server on core(s) {args.server_cores}, API and wrk on {args.api_cores}; "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    server = PinnedModelServer(base, cores=args.server_cores, log_path=log_dir / "serve.log", poll_wait_s=30.0)
    server.start()
    try:
        batched = BatchingSettings(max_batch_size=args.batch_size, batches_in_flight=args.batches_in_flight,
                                   max_batch_latency_ms=args.max_batch_latency_ms)
        naive = BatchingSettings(max_batch_size=1, batches_in_flight=args.naive_in_flight, max_batch_latency_ms=0.0, length_grouping=False)
        # The least padding any batcher can reach: the texts sorted by length, cut into batches, and
        # the batches sent in a shuffled order, so a cell of any duration sees every length alike
        # (sent in sorted order, a short cell would see mostly the short ones). Every size of
        # SORTED_SIZES is tried and the best counts: the ceiling must not depend on --batch-size.
        rng = random.Random(0)
        sorted_texts = {}
        for size in SORTED_SIZES:
            groups = [[texts[i] for i in batch] for batch in length_sorted_batches([len(t) for t in texts], size)]
            rng.shuffle(groups)
            sorted_texts[size] = [t for group in groups for t in group]
        runs: dict[str, list[dict]] = {"raw": [], "batched": [], "naive": [], "sorted": [], "single": []}
        # Rounds of raw, batched, naive: the best of each counts, so a burst of other load on the
        # shared machine costs a cell one round, not the comparison.
        for _ in range(args.repeats):
            runs["raw"].append(run_load(server.target, texts, batch_size=args.batch_size, clients=args.batches_in_flight,
                                        duration_s=args.duration_s, warmup_s=1.0))
            log.warning("raw: %.0f seq/s", runs["raw"][-1]["sequences_per_s"])
            runs["batched"].append(measure_api("batched", server.target, batched, args, bodies, log_dir))
            runs["naive"].append(measure_api("naive", server.target, naive, args, bodies, log_dir))
            runs["sorted"].append(max(
                (run_load(server.target, sorted_texts[size], batch_size=size, clients=args.batches_in_flight, duration_s=args.duration_s,
                          warmup_s=1.0, aligned=True) | {"batch_size": size} for size in SORTED_SIZES),
                key=lambda r: r["sequences_per_s"],
            ))
            runs["single"].append(run_load(server.target, texts, batch_size=1, clients=args.naive_in_flight,
                                           duration_s=args.duration_s, warmup_s=1.0))
            log.warning("model server alone: %.0f seq/s in length-sorted batches (best size %d), %.0f seq/s one per Predict",
                        runs["sorted"][-1]["sequences_per_s"], runs["sorted"][-1]["batch_size"], runs["single"][-1]["sequences_per_s"])
        for name, key in (("raw", "sequences_per_s"), ("batched", "requests_per_s"), ("naive", "requests_per_s"),
                          ("sorted", "sequences_per_s"), ("single", "sequences_per_s")):
            results[name] = max(runs[name], key=lambda r: r[key]) | {"runs": [round(r[key], 1) for r in runs[name]]}
        # Half load: each connection waits a random exponential gap between requests, sized so that
        # all of them together ask for half of the batched throughput.
        target = 0.5 * results["batched"]["requests_per_s"]
        results["half_load"] = measure_api("half-load", server.target, batched, args, bodies, log_dir, target_rate=target)
        results["half_load"]["target_requests_per_s"] = target
    finally:
        server.stop()
        scratch.cleanup()
    results["load_average_at_end"] = os.getloadavg()

    raw, b, n, h = results["raw"], results["batched"], results["naive"], results["half_load"]
    ceiling = results["sorted"]["sequences_per_s"] / results["single"]["sequences_per_s"]
    results["batching_gain_ceiling"] = ceiling
    rows = [
        (f"model server raw, batch {args.batch_size} x {args.batches_in_flight} in flight", f"{raw['sequences_per_s']:.0f} comments/s", ""),
        (f"API batched, {args.connections} clients, 1 comment/request", f"{b['requests_per_s']:.0f} req/s",
         f"{b['requests_per_s'] / raw['sequences_per_s']:.0%} of raw (target >= 70%); mean batch {b['mean_batch_size']:.1f}"),
        ("API naive (batching off: 1 Predict/request)", f"{n['requests_per_s']:.0f} req/s",
         f"batched is {b['requests_per_s'] / n['requests_per_s']:.1f}x (target >= 2.5x)"),
        (f"latency at {h['requests_per_s']:.0f} req/s (half load)", f"p50 {h['p50_ms']:.0f} / p90 {h['p90_ms']:.0f} / p99 {h['p99_ms']:.0f} ms",
         "target p99 <= 150 ms"),
        ("API CPU per request, full load", f"{b['api_cpu_ms_per_request']:.3f} ms", f"half load {h['api_cpu_ms_per_request']:.3f} ms; target <= 0.4 ms"),
        ("non-2xx answers (full, naive, half)", f"{b['non_2xx']}, {n['non_2xx']}, {h['non_2xx']}", ""),
        (f"model server alone, length-sorted batches of {results['sorted']['batch_size']}", f"{results['sorted']['sequences_per_s']:.0f} comments/s",
         f"batched API at {b['requests_per_s'] / results['sorted']['sequences_per_s']:.0%} of it"),
        (f"model server alone, 1 comment/Predict x {args.naive_in_flight}", f"{results['single']['sequences_per_s']:.0f} comments/s",
         (f"naive API at {n['requests_per_s'] / results['single']['sequences_per_s']:.0%} of it; "
          f"batching can gain at most {ceiling:.1f}x")),
    ]
    print(f"\nESP HTTP API benchmark: {model_desc}, {os.cpu_count()} CPUs")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<28} {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.chart:
        chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
