"""The HTTP API's CPU per request, this checkout against another source tree, side by side in one run.

The API benchmark (bench/bench_api.py) measures one version of the API. To see what a change to
the API's request path saves, this runs the API from two source trees in alternating rounds, in
front of the same pinned model server, under the same single-comment load from `wrk` (as in
bench_api.py: the API and `wrk` on core 0, `esp serve` on core 1), and prints each round's
requests/s and the API process's CPU per request:

    git worktree add /tmp/esp-before <commit>      # the version to compare with
    .venv/bin/python bench/bench_api_cpu.py --baseline-tree /tmp/esp-before --rounds 4

Alternating rounds matter on a shared VM, whose speed drifts by tens of percent within an hour;
compare only figures from one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from bench_api import start_api, wrk  # noqa: E402
from bench_serving import load_texts  # noqa: E402
from bench_worker import PinnedModelServer, choose_model, cpu_seconds  # noqa: E402

from esp.settings import BatchingSettings  # noqa: E402


def measure(tree: Path, server_target: str, bodies: Path, args: argparse.Namespace, log_path: Path) -> dict:
    """One round: the API started from the source tree `tree`."""
    batching = BatchingSettings(max_batch_size=32, batches_in_flight=2, max_batch_latency_ms=20.0)
    api = start_api(server_target, batching, cores="0", log_path=log_path, source_tree=tree)
    try:
        url = api.base_url + "/v1/score"
        wrk(url, connections=args.connections, duration_s=3, cores="0", bodies=bodies)  # warm-up
        cpu0 = cpu_seconds(api.pid)
        result = wrk(url, connections=args.connections, duration_s=args.duration_s, cores="0", bodies=bodies)
        cpu = cpu_seconds(api.pid) - cpu0
    finally:
        api.stop(timeout_s=30)
    return {"requests_per_s": result["requests_per_s"], "cpu_ms_per_request": 1000 * cpu / max(1, result["requests"]),
            "non_2xx": result["non_2xx"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", type=Path, required=True, help="a source tree of ESP to compare with (a git worktree)")
    parser.add_argument("--model", type=Path, default=None, help="model base path (default: models/bert)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    baseline = args.baseline_tree.resolve()
    if not (baseline / "api" / "server.py").is_file():
        raise SystemExit(f"--baseline-tree {baseline}: not an ESP source tree (no api/server.py)")

    with tempfile.TemporaryDirectory(prefix="esp-bench-api-cpu-") as scratch:
        log_dir = Path(scratch)
        base, model_desc = choose_model(args.model, test_model=False, scratch=log_dir)
        bodies = log_dir / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_texts(4096)), encoding="utf-8")
        server = PinnedModelServer(base, cores="1", log_path=log_dir / "serve.log", poll_wait_s=30.0)
        server.start()
        runs: dict[str, list[dict]] = {"baseline": [], "this checkout": []}
        try:
            for i in range(args.rounds):
                for name, tree in (("baseline", baseline), ("this checkout", REPO_ROOT)):
                    r = measure(tree, server.target, bodies, args, log_dir / f"api-{i}-{len(runs[name])}.log")
                    runs[name].append(r)
                    print(f"round {i + 1} {name:13s} {r['requests_per_s']:6.0f} req/s  API CPU {r['cpu_ms_per_request']:.3f} ms/request"
                          f"  non-2xx {r['non_2xx']}", flush=True)
        finally:
            server.stop()

    print(f"\nAPI CPU per request, {model_desc}, {args.connections} clients, {args.rounds} alternating rounds of {args.duration_s:g} s:")
    means = {name: statistics.mean(r["cpu_ms_per_request"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        print(f"  {name:13s} " + ", ".join(f"{r['cpu_ms_per_request']:.3f}" for r in rs) + f" ms (mean {means[name]:.3f})")
    print(f"  change: {means['this checkout'] / means['baseline'] - 1:+.0%}")
    if args.json:
        args.json.write_text(json.dumps({"model": model_desc, "connections": args.connections, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
