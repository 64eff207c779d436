"""Benchmark the Beam backfill against the model's own in-process throughput, in one run.

Texts are the shipped Jigsaw comments, repeated under new ids up to --comments (200,000 by default),
written as one JSONL file. Measured, one after the other on the same texts (the model alone both
before and after the backfill; the faster run is the baseline):

1. raw: the SavedModel in --workers processes, one TensorFlow thread each, scoring the distinct texts
   in batches of --batch-size cut from all of them sorted by length (the model alone at its best, no
   Beam; the backfill sorts windows of 1,024);
2. the backfill: `beam_jobs.backfill.run` on the multi-process DirectRunner (--workers processes,
   TensorFlow intra/inter-op threads 1 per process, a Reshuffle after reading since one file is one
   split), the in-process backend, scores and dead letters to files. Two rates: the whole run,
   start-up included, and the steady state: while the run goes, the bytes of scores the workers have
   written so far (Beam's temporary files) are sampled, and the rate between 10% and 90% of the
   final bytes leaves out start-up (worker processes, TensorFlow, the model) and the final commit.
   CPU-seconds are this process and its worker processes together, for the whole run.

Then a cost model: CPU-seconds per 1,000 comments, and per million comments on Dataflow for a
machine type and prices given on the command line (no price is built in).

    python bench/bench_backfill.py --model models/bert --comments 200000 --json out.json --chart out.png
    python bench/bench_backfill.py --model models/bert --vcpu-hour-usd 0.056 --gb-hour-usd 0.003557 --machine-vcpus 4 --machine-gb 15

docs/backfill.md records a run and its command; figures compare only within one run.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from esp.batcher import length_sorted_batches  # noqa: E402

DATA = REPO_ROOT / "data" / "jigsaw" / "jigsaw_trainsplit_union.csv.gz"


def distinct_texts() -> list[str]:
    csv.field_size_limit(10_000_000)
    seen: dict[str, None] = {}
    with gzip.open(DATA, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = row["comment_text"]
            if text.strip():
                seen.setdefault(text, None)
    return list(seen)


def write_input(path: Path, texts: list[str], n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"b{i:09d}", "text": texts[i % len(texts)]}, ensure_ascii=False) + "\n")


def length_batches(texts: list[str], batch_size: int) -> list[list[str]]:
    """The model at its best: every text sorted by length, then cut (the backfill sorts windows of 1,024)."""
    return [[texts[i] for i in batch] for batch in length_sorted_batches([len(t) for t in texts], batch_size)]


def _raw_worker(model: str, batches: list[list[str]], start: Any, out: Any) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from serving.saved_model import SavedModelScorer

    scorer = SavedModelScorer(model)
    scorer.predict(batches[0])  # warm up outside the timing
    start.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    n = 0
    for batch in batches:
        scorer.predict(batch)
        n += len(batch)
    out.put((n, time.perf_counter() - t0, time.process_time() - cpu0))


def raw_throughput(model: str, texts: list[str], batch_size: int, workers: int) -> dict[str, float]:
    batches = length_batches(texts, batch_size)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(model, batches[i::workers], start, out)) for i in range(workers)]
    for p in procs:
        p.start()
    start.wait()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    n = sum(r[0] for r in results)
    seconds = max(r[1] for r in results)
    cpu = sum(r[2] for r in results)
    return {"comments": n, "seconds": seconds, "comments_per_s": n / seconds, "cpu_s_per_1000": cpu / n * 1000}


def _cpu_now() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def backfill_throughput(model: str, input_path: Path, out_dir: Path, batch_size: int, workers: int) -> dict[str, float]:
    from beam_jobs.backfill import BackfillConfig, run
    from esp.settings import BackfillSettings

    config = BackfillConfig(
        input=str(input_path), output=str(out_dir), backend="saved_model", saved_model_dir=model,
        max_batch_size=batch_size, backfill=BackfillSettings(tf_threads=1, progress_interval_s=15),
    )
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.wait(0.5):
            written = sum(f.stat().st_size for d in out_dir.glob("beam-temp-scores*") for f in d.rglob("*") if f.is_file())
            samples.append((time.perf_counter() - t0, written))

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0 = _cpu_now()
    sampler.start()
    try:
        summary = run(config, ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
    finally:
        done.set()
        sampler.join()
    cpu = _cpu_now() - cpu0
    return {
        "comments": summary.scored, "dead_lettered": summary.dead_lettered, "seconds": summary.seconds,
        "comments_per_s": summary.rate, "cpu_s_per_1000": cpu / max(summary.scored, 1) * 1000,
        "steady_comments_per_s": steady_rate(samples, summary.scored),
    }


def steady_rate(samples: list[tuple[float, int]], comments: int) -> float | None:
    """Comments/s between the samples where 10% and 90% of the scores' bytes were written."""
    final = max((b for _, b in samples), default=0)
    if not final:
        return None
    t10 = next(t for t, b in samples if b >= 0.1 * final)
    t90 = next(t for t, b in samples if b >= 0.9 * final)
    return 0.8 * comments / (t90 - t10) if t90 > t10 else None


def cost_per_million(cpu_s_per_1000: float, *, vcpu_hour_usd: float, gb_hour_usd: float, machine_vcpus: int, machine_gb: float) -> float:
    """Dollars per million comments on workers kept busy: vCPU-hours plus their share of memory."""
    vcpu_hours = cpu_s_per_1000 * 1000 / 3600
    per_vcpu_hour = vcpu_hour_usd + gb_hour_usd * machine_gb / machine_vcpus
    return vcpu_hours * per_vcpu_hour


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["model alone\n(in process)", "backfill,\nwhole run", "backfill,\nsteady state"]
    values = [result["raw"]["comments_per_s"], result["backfill"]["comments_per_s"], result["backfill"].get("steady_comments_per_s") or 0.0]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar(labels, values, color=["#888888", "#9ecae1", "#1f77b4"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:,.0f}/s ({value / values[0] * 100:.0f}%)", ha="center", va="bottom")
    ax.axhline(0.7 * values[0], color="#d62728", lw=1, ls="--", label="70% of the model alone")
    ax.set_ylim(0, max(values) * 1.15)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("comments per second")
    ax.set_title(f"Backfill vs the model alone ({result['backfill']['comments']:,} comments, {result['workers']} processes, "
                 f"multi-process DirectRunner, {result['cpus']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "bert"), help="TF Serving base path of the model")
    parser.add_argument("--comments", type=int, default=200_000, help="comments through the backfill")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (and raw-model processes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--chart", type=Path, help="write a PNG here")
    parser.add_argument("--vcpu-hour-usd", type=float, help="price of one worker vCPU-hour (e.g. Dataflow batch)")
    parser.add_argument("--gb-hour-usd", type=float, help="price of one worker GB-hour of memory")
    parser.add_argument("--machine-vcpus", type=int, default=4, help="vCPUs of the worker machine type")
    parser.add_argument("--machine-gb", type=float, default=15.0, help="memory of the worker machine type, GB")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    texts = distinct_texts()
    print(f"{len(texts):,} distinct shipped comments; backfill of {args.comments:,} (repeated under new ids)", flush=True)
    runs = [raw_throughput(args.model, texts, args.batch_size, args.workers)]
    print(f"raw model, {args.workers} processes x 1 thread: {runs[0]['comments_per_s']:,.0f} comments/s, "
          f"{runs[0]['cpu_s_per_1000']:.2f} CPU-s per 1,000", flush=True)
    with tempfile.TemporaryDirectory(prefix="esp-bench-backfill-") as tmp:
        input_path = Path(tmp) / "comments.jsonl"
        write_input(input_path, texts, args.comments)
        backfill = backfill_throughput(args.model, input_path, Path(tmp) / "out", args.batch_size, args.workers)
    # The model alone again after the backfill: this machine's speed drifts between minutes, and the
    # faster of the two runs is the baseline, so drift cannot flatter the backfill.
    runs.append(raw_throughput(args.model, texts, args.batch_size, args.workers))
    print(f"raw model again: {runs[1]['comments_per_s']:,.0f} comments/s, {runs[1]['cpu_s_per_1000']:.2f} CPU-s per 1,000", flush=True)
    raw = dict(max(runs, key=lambda r: r["comments_per_s"]), runs=[round(r["comments_per_s"], 1) for r in runs])
    ratio = backfill["comments_per_s"] / raw["comments_per_s"]
    steady = backfill["steady_comments_per_s"]
    steady_ratio = steady / raw["comments_per_s"] if steady else None
    print(f"backfill: {backfill['comments']:,} comments in {backfill['seconds']:.1f}s = {backfill['comments_per_s']:,.0f} comments/s "
          f"({ratio * 100:.0f}% of the model alone), {backfill['cpu_s_per_1000']:.2f} CPU-s per 1,000", flush=True)
    if steady_ratio is not None:
        print(f"backfill steady state (10% to 90% of the scores written): {steady:,.0f} comments/s "
              f"({steady_ratio * 100:.0f}% of the model alone)", flush=True)
    result: dict[str, Any] = {
        "model": args.model, "workers": args.workers, "batch_size": args.batch_size, "distinct_texts": len(texts),
        "raw": raw, "backfill": backfill, "ratio": ratio, "steady_ratio": steady_ratio, "cpus": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.vcpu_hour_usd is not None and args.gb_hour_usd is not None:
        price = dict(vcpu_hour_usd=args.vcpu_hour_usd, gb_hour_usd=args.gb_hour_usd,
                     machine_vcpus=args.machine_vcpus, machine_gb=args.machine_gb)
        result["cost_per_million_usd"] = cost_per_million(backfill["cpu_s_per_1000"], **price)
        result["price"] = price
        print(f"cost per million comments: ${result['cost_per_million_usd']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.chart:
        chart(result, args.chart)


if __name__ == "__main__":
    main()
