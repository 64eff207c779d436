"""Benchmark `esp serve`: the "raw model" throughput and latency the worker is measured against.

Two tables, both through ESP's gRPC client (serving.client.TFServingScorer) against a real
`esp serve` child process on 127.0.0.1:
1. one client sending batches of 1, 8, 32 and 128 real comments back to back (no server-side
   batching): sequences/s and per-request latency;
2. N concurrent clients each sending one comment at a time, with server-side batching off and
   on: what batching buys when traffic arrives one item at a time.

Texts are real comments from data/jigsaw (their natural length mix). Usage:

    python bench/bench_serving.py MODEL_BASE_PATH [--duration-s 5] [--clients 16]
    python bench/bench_serving.py --test-model     # the tiny test model (tests/fixtures/models.py)

Run it on a quiet machine: the figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serving.client import TFServingScorer  # noqa: E402
from serving.local import ModelServerProcess  # noqa: E402

DATA = REPO_ROOT / "data" / "jigsaw" / "jigsaw_trainsplit_union.csv.gz"
BATCH_SIZES = (1, 8, 32, 128)


def load_texts(n: int = 4096) -> list[str]:
    csv.field_size_limit(10_000_000)
    texts = []
    with gzip.open(DATA, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["comment_text"].strip():
                texts.append(row["comment_text"])
            if len(texts) >= n:
                break
    return texts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(
    target: str, texts: list[str], *, batch_size: int, clients: int, duration_s: float, warmup_s: float, aligned: bool = False
) -> dict:
    """`clients` threads each send batches of `batch_size` back to back for `duration_s`.

    Client i starts at text i x 997 (so clients do not send the same texts); with `aligned`, at the
    nearest multiple of `batch_size` instead, so every batch sent is one of `texts`' consecutive
    groups of `batch_size` (the length-sorted groups of bench_api's ceiling).
    """
    latencies: list[float] = []
    rows = 0
    errors = 0
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    scorer = TFServingScorer(target, timeout_s=60.0, retry_budget_s=0.0)
    measure_from = [0.0]
    stop_at = [0.0]

    def client(index: int) -> None:
        nonlocal rows, errors
        offset = index * 997 - (index * 997) % batch_size if aligned else index * 997
        start_gate.wait()
        while True:
            now = time.perf_counter()
            if now >= stop_at[0]:
                return
            batch = [texts[(offset + i) % len(texts)] for i in range(batch_size)]
            offset += batch_size
            t0 = time.perf_counter()
            try:
                scorer.predict(batch)
            except Exception:
                with lock:
                    errors += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from[0]:
                with lock:
                    latencies.append(t1 - t0)
                    rows += batch_size

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    measure_from[0] = begin + warmup_s
    stop_at[0] = begin + warmup_s + duration_s
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - measure_from[0]
    scorer.close()
    return {
        "batch_size": batch_size,
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "sequences_per_s": rows / elapsed if elapsed > 0 else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * percentile(latencies, 0.95) if latencies else float("nan"),
        "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else float("nan"),
    }


def print_table(title: str, results: list[dict], key: str) -> None:
    print(f"\n{title}")
    print(f"{key:>16} {'seq/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'requests':>9} {'errors':>7}")
    for r in results:
        print(
            f"{r['label']:>16} {r['sequences_per_s']:>9.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['requests']:>9d} {r['errors']:>7d}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_path", nargs="?", help="TF Serving base path of the model (<base>/<version>/)")
    parser.add_argument("--test-model", action="store_true", help="export and use the tiny test model instead")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--clients", type=int, default=16, help="concurrent single-item clients in table 2")
    parser.add_argument("--max-execution-batch-size", type=int, default=32, help="server-side batching: batch run")
    parser.add_argument("--batch-timeout-micros", type=int, default=2000, help="server-side batching: wait to fill")
    parser.add_argument("--num-batch-threads", type=int, default=os.cpu_count() or 1, help="server-side batching threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--chart", type=Path, help="also draw throughput and p99 latency by batch size (PNG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    scratch = None
    if args.test_model:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.fixtures.models import export_test_model

        scratch = tempfile.TemporaryDirectory(prefix="esp-bench-")
        base = Path(scratch.name) / "bert"
        export_test_model(base, 1)
        model_desc = "test model (tests/fixtures/models.py)"
    elif args.base_path:
        base = Path(args.base_path).resolve()
        model_desc = str(base)
    else:
        parser.error("give a model base path, or --test-model")

    texts = load_texts()
    print(f"model: {model_desc}; {len(texts)} Jigsaw comments; {args.duration_s:g} s per cell; cpus: {os.cpu_count()}")
    report: dict = {"model": model_desc, "duration_s": args.duration_s}

    with ModelServerProcess(base, poll_wait_s=30.0) as server:
        by_batch = []
        for size in BATCH_SIZES:
            r = run_load(server.target, texts, batch_size=size, clients=1, duration_s=args.duration_s, warmup_s=args.warmup_s)
            r["label"] = f"batch {size}"
            by_batch.append(r)
            print(f"  batch {size}: {r['sequences_per_s']:.1f} seq/s", file=sys.stderr)
        plain = run_load(server.target, texts, batch_size=1, clients=args.clients, duration_s=args.duration_s, warmup_s=args.warmup_s)
        plain["label"] = "batching off"
    batching_args = [
        "--enable-batching",
        "--max-execution-batch-size", str(args.max_execution_batch_size),
        "--batch-timeout-micros", str(args.batch_timeout_micros),
        "--num-batch-threads", str(args.num_batch_threads),
    ]
    with ModelServerProcess(base, poll_wait_s=30.0, extra_args=batching_args) as server:
        batched = run_load(server.target, texts, batch_size=1, clients=args.clients, duration_s=args.duration_s, warmup_s=args.warmup_s)
        batched["label"] = "batching on"

    print_table("1. one client, batches back to back (server-side batching off)", by_batch, "batch size")
    print_table(
        f"2. {args.clients} concurrent clients, one comment per request "
        f"(batching on: max_execution_batch_size={args.max_execution_batch_size}, "
        f"batch_timeout_micros={args.batch_timeout_micros}, num_batch_threads={args.num_batch_threads})",
        [plain, batched],
        "server",
    )
    report.update(by_batch_size=by_batch, concurrent_single=[plain, batched])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.chart:
        draw_chart(report, args.chart)
    if scratch:
        scratch.cleanup()
    return 0


def draw_chart(report: dict, path: Path) -> None:
    """Throughput (bars) and p99 latency (line) by client batch size: where batching stops paying."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["by_batch_size"]
    labels = [str(r["batch_size"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, [r["sequences_per_s"] for r in rows], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xlabel("client batch size (one client, requests back to back)")
    ax.set_ylabel("comments / s")
    ax2 = ax.twinx()
    ax2.plot(labels, [r["p99_ms"] for r in rows], color="tab:red", marker="o")
    ax2.set_ylabel("p99 latency, ms", color="tab:red")
    ax.set_title(f"esp serve: {Path(report['model']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
