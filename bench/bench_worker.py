"""Benchmark the scoring worker end to end against the model server's own throughput, in one run.

Everything runs on this machine: Google's Pub/Sub emulator, `esp serve` (pinned with taskset to the
same core(s) in every measurement, so the emulator, the worker and this script compete the same
way each time) and `esp worker run` as a child process (TF Serving backend: no TensorFlow in the
worker). Texts are the shipped Jigsaw comments in their natural length mix. Measured:

1. raw model server throughput: batches of --batch-size, --batches-in-flight concurrent clients
   (bench/bench_serving.py's load generator);
2. the naive path, one Predict per comment: raw (one client) and through the emulator (the worker
   with batch size 1 and one batch in flight, as ESP's original Flask client worked);
3. the worker end to end (backlog drained: emulator -> worker -> model server -> emulator), with
   and without length grouping, plus the worker's CPU-seconds per 1,000 messages;
4. end-to-end latency (comment publish time -> score received by a subscriber) at about half of
   the end-to-end throughput;
5. worker ready time and peak RSS with a 100,000-message backlog waiting.

    python bench/bench_worker.py                      # models/bert (make model) if present, else the test model
    python bench/bench_worker.py --model PATH --batch-size 32 --server-cores 1 --json out.json
    python bench/bench_worker.py --test-model --chart docs/figures/worker-throughput.png

Figures are comparable only within one run; docs/worker.md records a run and its command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from bench_serving import load_texts, percentile, run_load  # noqa: E402

from esp.localstack import PubSubEmulator, isolated_pubsub_settings, wait_until  # noqa: E402
from esp.pubsub import publisher_client, subscriber_client  # noqa: E402
from esp.pubsub_admin import init_resources  # noqa: E402
from esp.settings import ModelClientSettings, PubSubSettings  # noqa: E402
from esp.settings import BatchingSettings, build  # noqa: E402
from esp.settings.worker import WorkerSettings  # noqa: E402
from serving.local import ModelServerProcess  # noqa: E402
from worker.local import WorkerProcess  # noqa: E402

log = logging.getLogger("bench_worker")
DEFAULT_MODEL = REPO_ROOT / "models" / "bert"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class PinnedModelServer(ModelServerProcess):
    """`esp serve` under `taskset -c CORES`: every thread it starts inherits the pinning."""

    def __init__(self, *args: Any, cores: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cores = cores

    def command(self) -> list[str]:
        return ["taskset", "-c", self.cores, *super().command()]


# ---------------------------------------------------------------------------------------------
# helpers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fresh_pubsub(emulator: PubSubEmulator) -> PubSubSettings:
    settings = isolated_pubsub_settings(emulator.host, prefix="bench", ack_deadline_s=60)
    init_resources(settings)
    return settings


def publish_backlog(settings: PubSubSettings, texts: list[str], n: int, prefix: str) -> float:
    """Publishes `n` comments (texts cycled, ids unique); returns seconds taken."""
    publisher = publisher_client(settings)
    topic = settings.topic_path(settings.comments_topic)
    started = time.monotonic()
    futures = []
    for i in range(n):
        body = json.dumps({"id": f"{prefix}-{i}", "text": texts[i % len(texts)]}).encode()
        futures.append(publisher.publish(topic, body))
        if len(futures) >= 5000:
            for f in futures:
                f.result(timeout=120)
            futures.clear()
    for f in futures:
        f.result(timeout=120)
    elapsed = time.monotonic() - started
    publisher.stop()
    return elapsed


def worker_settings(args: argparse.Namespace, **overrides: Any) -> tuple[WorkerSettings, BatchingSettings]:
    values: dict[str, Any] = dict(
        max_batch_size=args.batch_size,
        batches_in_flight=args.batches_in_flight,
        max_batch_latency_ms=args.max_batch_latency_ms,
        metrics_port=0,
        metrics_host="127.0.0.1",
        worker_id="bench-worker",
        shutdown_grace_s=10.0,
    )
    values.update(overrides)
    return build(WorkerSettings, values), build(BatchingSettings, values)


def drain_backlog(
    label: str, emulator: PubSubEmulator, client: ModelClientSettings, texts: list[str], n: int, settings: tuple[WorkerSettings, BatchingSettings],
    log_dir: Path, server_pid: int,
) -> dict:
    """Publishes a backlog of `n`, starts a worker, times it from ready to the n-th confirmed score."""
    pubsub = fresh_pubsub(emulator)
    publish_backlog(pubsub, texts, n, label)
    proc = WorkerProcess(pubsub, client, *settings, log_path=log_dir / f"worker-{label}.log", env={"ESP_LOG_LEVEL": "WARNING"})
    proc.start()
    try:
        cpu0 = cpu_seconds(proc.pid)
        emu0, srv0 = cpu_seconds(emulator.pid), cpu_seconds(server_pid)
        t0 = time.monotonic()
        done = [0.0]

        def finished() -> bool:
            scored = proc.metric("esp_messages_total", outcome="scored")
            done[0] = scored
            return scored >= n

        wait_until(finished, timeout_s=max(120.0, n / 20), interval_s=0.1, what=f"{n} scores ({label})")
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        emu_cpu, srv_cpu = cpu_seconds(emulator.pid) - emu0, cpu_seconds(server_pid) - srv0
        batch_count = proc.metric("esp_batch_size_count")
        batch_sum = proc.metric("esp_batch_size_sum")
    finally:
        proc.stop(timeout_s=20)
    result = {
        "label": label,
        "messages": n,
        "seconds": elapsed,
        "messages_per_s": n / elapsed,
        "worker_cpu_s_per_1000": 1000 * cpu / n,
        "emulator_cpu_s_per_1000": 1000 * emu_cpu / n,
        "model_server_cpu_s_per_1000": 1000 * srv_cpu / n,
        "mean_batch_size": batch_sum / batch_count if batch_count else float("nan"),
    }
    log.warning(
        "%s: %.0f msg/s; CPU-s per 1000: worker %.2f, emulator %.2f, model server %.2f", label, result["messages_per_s"],
        result["worker_cpu_s_per_1000"], result["emulator_cpu_s_per_1000"], result["model_server_cpu_s_per_1000"],
    )
    return result


class ScoreReader:
    """Pulls the scores topic; records (receive time - comment publish time) for each score."""

    def __init__(self, settings: PubSubSettings, subscription: str) -> None:
        self.settings = settings
        self.path = settings.subscription_path(subscription)
        self.client = subscriber_client(settings)
        self.latencies_s: list[float] = []
        self.ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from google.api_core import exceptions as gexc

        while not self._stop.is_set():
            try:
                resp = self.client.pull(request={"subscription": self.path, "max_messages": 1000}, timeout=1.5, retry=None)
            except gexc.DeadlineExceeded:
                continue
            now = dt.datetime.now(dt.timezone.utc)
            received = resp.received_messages
            if not received:
                continue
            self.client.acknowledge(request={"subscription": self.path, "ack_ids": [r.ack_id for r in received]})
            for r in received:
                rec = json.loads(r.message.data)
                published = dt.datetime.fromisoformat(rec["published_at"].replace("Z", "+00:00"))
                self.latencies_s.append((now - published).total_seconds())
                self.ids.add(rec["id"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()


def latency_at_rate(
    emulator: PubSubEmulator, client: ModelClientSettings, texts: list[str], rate: float, duration_s: float,
    settings: tuple[WorkerSettings, BatchingSettings], log_dir: Path,
) -> dict:
    """Publishes at `rate` msg/s for `duration_s` to a running worker; percentiles of publish -> score received."""
    pubsub = fresh_pubsub(emulator)
    sub_name = f"scores-read-{uuid.uuid4().hex[:8]}"
    admin = subscriber_client(pubsub)
    admin.create_subscription(request={"name": pubsub.subscription_path(sub_name), "topic": pubsub.topic_path(pubsub.scores_topic)})
    admin.close()
    proc = WorkerProcess(pubsub, client, *settings, log_path=log_dir / "worker-latency.log", env={"ESP_LOG_LEVEL": "WARNING"})
    proc.start()
    reader = ScoreReader(pubsub, sub_name)
    publisher = publisher_client(pubsub)
    topic = pubsub.topic_path(pubsub.comments_topic)
    try:
        n = int(rate * duration_s)
        started = time.monotonic()
        futures = []
        tick_s = 0.01
        for i in range(n):
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > tick_s:
                time.sleep(delay)
            body = json.dumps({"id": f"lat-{i}", "text": texts[i % len(texts)]}).encode()
            futures.append(publisher.publish(topic, body))
        for f in futures:
            f.result(timeout=60)
        achieved = n / (time.monotonic() - started)
        wait_until(lambda: len(reader.ids) >= n, timeout_s=60, what="every latency-run score")
    finally:
        reader.close()
        publisher.stop()
        proc.stop(timeout_s=20)
    # The first second warms caches and connections; it is left out of the percentiles.
    lat = sorted(reader.latencies_s[int(rate):]) or sorted(reader.latencies_s)
    return {
        "rate_asked": rate,
        "rate_achieved": achieved,
        "messages": n,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * percentile(lat, 0.95),
        "p99_ms": 1000 * percentile(lat, 0.99),
        "max_ms": 1000 * lat[-1],
    }


def ready_and_rss(
    emulator: PubSubEmulator, client: ModelClientSettings, texts: list[str], backlog: int, settings: tuple[WorkerSettings, BatchingSettings],
    watch_s: float, log_dir: Path,
) -> dict:
    """A worker started with `backlog` messages waiting: seconds to /readyz 200, then peak RSS while it works."""
    pubsub = fresh_pubsub(emulator)
    publish_s = publish_backlog(pubsub, texts, backlog, "rss")
    proc = WorkerProcess(pubsub, client, *settings, log_path=log_dir / "worker-rss.log", env={"ESP_LOG_LEVEL": "WARNING"})
    t0 = time.monotonic()
    proc.start()
    ready_s = time.monotonic() - t0
    peak = 0.0
    try:
        end = time.monotonic() + watch_s
        while time.monotonic() < end:
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.1)
        hwm = rss_mib(proc.pid, "VmHWM")
        scored = proc.metric("esp_messages_total", outcome="scored")
        held = proc.metric("esp_in_flight_messages")
        tf_loaded = "tensorflow" in Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.stop(timeout_s=20)
    return {
        "backlog": backlog,
        "publish_s": publish_s,
        "ready_s": ready_s,
        "peak_rss_mib": max(peak, hwm),
        "scored_while_watched": scored,
        "held_at_end": held,
        "tensorflow_loaded": tf_loaded,
        "watch_s": watch_s,
    }


def batcher_batches(texts: list[str], batch_size: int, grouping: bool, pool: int) -> list[list[str]]:
    """The batches the worker's batcher forms from a backlog (`pool` comments waiting, as with a full ledger)."""
    from esp.batcher import MicroBatcher

    batcher: MicroBatcher[str] = MicroBatcher(max_batch_size=batch_size, max_latency_s=0.0, length_grouping=grouping, length=len)
    batches = []
    feed = iter(texts)
    for text in itertools.islice(feed, pool):
        batcher.add(text, 0.0)
    while len(batcher):
        batch = batcher.pop(1.0)
        assert batch is not None
        batches.append(batch)
        for text in itertools.islice(feed, len(batch)):
            batcher.add(text, 0.0)
    return batches


def raw_over_batches(target: str, batches: list[list[str]], clients: int, duration_s: float) -> float:
    """Model server throughput, texts/s, over these exact batches (`clients` concurrent senders)."""
    from serving.client import TFServingScorer

    scorer = TFServingScorer(target, timeout_s=60.0, retry_budget_s=0.0)
    rows = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def send(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            batch = batches[i % len(batches)]
            scorer.predict(batch)
            with lock:
                rows[0] += len(batch)
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scorer.close()
    return rows[0] / (time.perf_counter() - started)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("raw server\nbatch %d" % results["batch_size"], results["raw"]["sequences_per_s"]),
        ("worker e2e\ngrouping on", results["e2e_grouping_on"]["messages_per_s"]),
        ("worker e2e\ngrouping off", results["e2e_grouping_off"]["messages_per_s"]),
        ("naive raw\n1 per call", results["naive_raw"]["sequences_per_s"]),
        ("naive e2e\n1 per call", results["naive_e2e"]["messages_per_s"]),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["#777", "#1f77b4", "#6baed6", "#d62728", "#ff9896"])
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("comments / s")
    ax.set_title(f"ESP worker throughput ({results['model']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def choose_model(model: Path | None, *, test_model: bool, scratch: Path) -> tuple[Path, str]:
    """The model base path to benchmark and how to name it: `model`, else models/bert, else the test model."""
    if test_model or (model is None and not (DEFAULT_MODEL / "1").exists()):
        from tests.fixtures.models import export_test_model

        base = scratch / "bert"
        export_test_model(base, 1)
        return base, "test model (tests/fixtures/models.py)"
    base = (model or DEFAULT_MODEL).resolve()
    return base, str(base.relative_to(REPO_ROOT)) if base.is_relative_to(REPO_ROOT) else str(base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model base path (default: models/bert, the default model, if present)")
    parser.add_argument("--test-model", action="store_true", help="use the tiny test model (tests/fixtures/models.py)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--max-batch-latency-ms", type=float, default=20.0)
    parser.add_argument("--server-cores", default="1", help="taskset core list for the model server")
    parser.add_argument("--raw-duration-s", type=float, default=8.0)
    parser.add_argument("--backlog-s", type=float, default=20.0, help="size each backlog run to about this many seconds")
    parser.add_argument("--naive-s", type=float, default=10.0)
    parser.add_argument("--latency-s", type=float, default=20.0)
    parser.add_argument("--rss-backlog", type=int, default=100_000)
    parser.add_argument("--rss-watch-s", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each throughput cell; the best counts (less noise from other load)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    scratch = tempfile.TemporaryDirectory(prefix="esp-bench-worker-")
    log_dir = Path(scratch.name)
    base, model_desc = choose_model(args.model, test_model=args.test_model, scratch=log_dir)
    texts = load_texts(20_000)
    lengths = sorted(len(t) for t in texts)
    results: dict[str, Any] = {
        "model": model_desc,
        "batch_size": args.batch_size,
        "batches_in_flight": args.batches_in_flight,
        "server_cores": args.server_cores,
        "cpus": os.cpu_count(),
        "texts": len(texts),
        "text_length_chars": {"p50": lengths[len(lengths) // 2], "p95": lengths[int(0.95 * len(lengths))], "max": lengths[-1]},
        "load_average_at_start": os.getloadavg(),
    }
    print(f"model: {model_desc}; batch {args.batch_size}; model server on core(s) {args.server_cores}; "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    emulator = PubSubEmulator(log_path=log_dir / "emulator.log")
    server = PinnedModelServer(base, cores=args.server_cores, log_path=log_dir / "serve.log", poll_wait_s=30.0)
    emulator.start()
    try:
        server.start()
        client = ModelClientSettings(model_server=server.target, model_timeout_s=60.0)
        def best(cells: list[dict], key: str) -> dict:
            return max(cells, key=lambda c: c[key]) | {"runs": [round(c[key], 1) for c in cells]}

        raw = best([run_load(server.target, texts, batch_size=args.batch_size, clients=args.batches_in_flight,
                             duration_s=args.raw_duration_s, warmup_s=1.0) for _ in range(args.repeats)], "sequences_per_s")
        results["raw"] = raw
        log.warning("raw: %s seq/s", raw["runs"])
        naive_raw = best([run_load(server.target, texts, batch_size=1, clients=1, duration_s=args.raw_duration_s, warmup_s=1.0)
                          for _ in range(args.repeats)], "sequences_per_s")
        results["naive_raw"] = naive_raw
        log.warning("naive raw: %s seq/s", naive_raw["runs"])
        pool = worker_settings(args)[0].max_outstanding_messages
        for grouping in (True, False):
            batches = batcher_batches(texts, args.batch_size, grouping, pool)
            cells = [raw_over_batches(server.target, batches, args.batches_in_flight, args.raw_duration_s) for _ in range(args.repeats)]
            results[f"raw_batcher_grouping_{'on' if grouping else 'off'}"] = {"sequences_per_s": max(cells), "runs": cells}
            log.warning("raw over the batcher's batches, grouping %s: %s seq/s", grouping, [round(c) for c in cells])

        n = max(2000, int(raw["sequences_per_s"] * args.backlog_s))
        # An unmeasured drain first: the emulator's JVM is still compiling its hot paths in the first one.
        drain_backlog("warm-up", emulator, client, texts, min(n, 5000), worker_settings(args), log_dir, server.pid)
        on_runs, off_runs = [], []
        for k in range(args.repeats):
            # Alternate the order so neither setting always runs second.
            for grouping in ((True, False) if k % 2 == 0 else (False, True)):
                label = f"grouping-{'on' if grouping else 'off'}"
                runs = on_runs if grouping else off_runs
                runs.append(drain_backlog(label, emulator, client, texts, n, worker_settings(args, length_grouping=grouping), log_dir, server.pid))
        results["e2e_grouping_on"] = best(on_runs, "messages_per_s")
        results["e2e_grouping_off"] = best(off_runs, "messages_per_s")
        n_naive = max(300, int(naive_raw["sequences_per_s"] * args.naive_s))
        results["naive_e2e"] = drain_backlog(
            "naive", emulator, client, texts, n_naive,
            worker_settings(args, max_batch_size=1, batches_in_flight=1, length_grouping=False, max_batch_latency_ms=0.0), log_dir, server.pid,
        )
        half = 0.5 * results["e2e_grouping_on"]["messages_per_s"]
        results["latency_half_load"] = latency_at_rate(emulator, client, texts, half, args.latency_s, worker_settings(args), log_dir)
        results["ready_rss"] = ready_and_rss(emulator, client, texts, args.rss_backlog, worker_settings(args), args.rss_watch_s, log_dir)
    finally:
        server.stop()
        emulator.stop()
        scratch.cleanup()

    results["load_average_at_end"] = os.getloadavg()
    on, off = results["e2e_grouping_on"], results["e2e_grouping_off"]
    lat, rr = results["latency_half_load"], results["ready_rss"]
    rows = [
        ("model server raw, batch %d x %d in flight" % (args.batch_size, args.batches_in_flight), f"{raw['sequences_per_s']:.0f} msg/s", ""),
        ("worker end to end, length grouping on", f"{on['messages_per_s']:.0f} msg/s",
         f"{on['messages_per_s'] / raw['sequences_per_s']:.0%} of raw (target >= 85%)"),
        ("worker end to end, length grouping off", f"{off['messages_per_s']:.0f} msg/s",
         f"grouping gain {on['messages_per_s'] / off['messages_per_s']:.2f}x (target >= 1.3x)"),
        ("model server alone over the batcher's batches, grouping on",
         f"{results['raw_batcher_grouping_on']['sequences_per_s']:.0f} msg/s",
         f"grouping gain {results['raw_batcher_grouping_on']['sequences_per_s'] / results['raw_batcher_grouping_off']['sequences_per_s']:.2f}x for the model alone"),
        ("model server alone over the batcher's batches, grouping off",
         f"{results['raw_batcher_grouping_off']['sequences_per_s']:.0f} msg/s", ""),
        ("naive: one Predict per comment, raw", f"{naive_raw['sequences_per_s']:.0f} msg/s", ""),
        ("naive: one Predict per comment, end to end", f"{results['naive_e2e']['messages_per_s']:.0f} msg/s",
         f"worker is {on['messages_per_s'] / results['naive_e2e']['messages_per_s']:.1f}x (target >= 3x)"),
        (f"latency at {lat['rate_achieved']:.0f} msg/s (half load)", f"p50 {lat['p50_ms']:.0f} / p95 {lat['p95_ms']:.0f} / p99 {lat['p99_ms']:.0f} ms",
         "target p99 <= 500 ms"),
        ("worker CPU per 1,000 messages", f"{on['worker_cpu_s_per_1000']:.2f} CPU-s",
         f"emulator {on['emulator_cpu_s_per_1000']:.2f}, model server {on['model_server_cpu_s_per_1000']:.2f}; mean batch {on['mean_batch_size']:.1f}"),
        (f"worker ready with {rr['backlog']:,} backlog", f"{rr['ready_s']:.2f} s", "target <= 3 s"),
        ("worker peak RSS with that backlog", f"{rr['peak_rss_mib']:.0f} MiB",
         f"target <= 300 MiB; TensorFlow loaded: {rr['tensorflow_loaded']}"),
    ]
    print(f"\nESP worker benchmark: {model_desc}, {os.cpu_count()} CPUs, model server on core(s) {args.server_cores}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<30} {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.chart:
        chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
