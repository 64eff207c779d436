"""The quality-speed frontier: what each trained model gives (test mean ROC AUC) and costs
(serving throughput through `esp serve`, training time), side by side in one run.

For each model given as NAME=BASE_PATH:
- test mean ROC AUC on the held-out test split, scored through the exported signature, and the
  paired bootstrap 95% interval of its difference from the reference model (training/compare.py:
  the same test rows for both models, resampled together);
- serving throughput: a real `esp serve` child process, one client sending batches of 32 real
  Jigsaw comments back to back (bench_serving.py's table 1 at batch 32), comments/s;
- training time: `train_wall_seconds` from the model's esp_model_info.json (data reading,
  teachers' soft targets, tokenising, the wide part's fit, the encoder), and for a distilled
  student also with its teachers' training time added.

Usage (`make frontier` runs it on the models `make` builds):

    python bench/bench_frontier.py tiny=models/tiny demo=models/demo default=models/bert \\
        default-distilled=models/bert-distilled minilm=models/minilm --reference default \\
        --data-dir artifacts/data --json docs/figures/frontier.json --chart docs/figures/frontier.png

Servers run one at a time, so each model has the machine's cores to itself (as far as the
machine is quiet: the figures are comparable within one run).

`--merge-into JSON` adds a model trained later to an earlier frontier without training the others
again: measure it beside the reference, e.g. `default=models/bert minilm=models/minilm`, and the
new rows join the earlier report (a row of the same name is replaced). Throughput is compared
only within a run, so each row keeps its ratio to the reference as measured in its own run, and
says when that run was. The reference must be the same model in both runs (same test score),
else the merge is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from bench_serving import load_texts, run_load  # noqa: E402

from serving.local import ModelServerProcess  # noqa: E402


def model_entry(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=BASE_PATH, got {spec!r}")
    return name, Path(path)


def fresh_train_seconds(info: dict) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds) that `esp train` took, as a fresh run would: a wide part that came
    from the cache is counted at what it cost when it was fitted. CPU time (all threads) hardly
    depends on what else the machine runs; wall time on a shared machine does."""
    timings = info.get("timings") or {}
    wall = float(info.get("train_wall_seconds") or info.get("train_seconds") or 0.0)
    cpu = info.get("train_cpu_seconds")
    if timings.get("wide_fit_cached"):
        wall += float(timings.get("wide_fit_uncached", 0.0)) - float(timings.get("wide_fit", 0.0))
        extra = timings.get("wide_fit_cpu_uncached")
        cpu = None if cpu is None or extra is None else float(cpu) + float(extra)
    return wall, (float(cpu) if cpu is not None else None)


def teacher_seconds(info: dict) -> tuple[float, float | None]:
    """Training time of a distilled model's teachers (each cross-fit teacher trained separately)."""
    from training.export import read_model_info

    wall, cpu = 0.0, 0.0
    for t in (info.get("distillation") or {}).get("teachers", []):
        try:
            w, c = fresh_train_seconds(read_model_info(t["version_dir"]))
        except OSError:
            logging.warning("teacher %s is gone: its training time is not counted", t["version_dir"])
            continue
        wall += w
        cpu = None if cpu is None or c is None else cpu + c
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=model_entry, metavar="NAME=BASE_PATH")
    parser.add_argument("--reference", default="default", help="the model every difference is measured against")
    parser.add_argument("--data-dir", default="artifacts/data", help="prepared data (its test split is scored)")
    parser.add_argument("--batch-size", type=int, default=32, help="client batch size of the throughput measurement")
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured seconds of serving per model")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before measuring")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--chart", type=Path, help="also draw the frontier (PNG)")
    parser.add_argument("--redraw", type=Path, metavar="JSON", help="measure nothing: draw --chart from a report this script wrote")
    parser.add_argument("--merge-into", type=Path, metavar="JSON",
                        help="add this run's models to an earlier report (same reference model); --json then writes the merged report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.redraw:
        if not args.chart:
            parser.error("--redraw needs --chart")
        draw_chart(json.loads(args.redraw.read_text()), args.chart)
        return 0
    if not args.models:
        parser.error("give at least one NAME=BASE_PATH")
    names = [n for n, _ in args.models]
    if args.reference not in names:
        parser.error(f"--reference {args.reference!r} is not one of {', '.join(names)}")
    earlier = None
    if args.merge_into:
        try:
            earlier = json.loads(args.merge_into.read_text())
            # What can be checked before the measurement is, so a refusal does not cost one.
            merge_reports(earlier, {"reference": args.reference, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                                    "test_rows": earlier.get("test_rows") if isinstance(earlier, dict) else None, "models": []})
        except (OSError, ValueError) as e:
            parser.error(f"--merge-into {args.merge_into}: {e}")

    from serving.saved_model_files import resolve_version_dir
    from training import records
    from training.compare import paired_bootstrap
    from training.evaluate import score_saved_model
    from training.export import read_model_info
    from training.metrics import mean_auc, roc_aucs

    labels = records.read_stats(args.data_dir)["labels"]
    test = records.read_split(args.data_dir, "test", len(labels))
    texts = load_texts()
    print(f"test split: {len(test)} comments; serving: {len(texts)} Jigsaw comments, batch {args.batch_size}, "
          f"{args.duration_s:g} s per model; cpus: {os.cpu_count()}", flush=True)

    measured_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    rows, probs = [], {}
    for name, base in args.models:
        version_dir, version = resolve_version_dir(base)
        info = read_model_info(version_dir)
        t0 = time.monotonic()
        model_labels, p, _ = score_saved_model(version_dir, test.texts)
        probs[name] = p[:, [model_labels.index(l) for l in labels]]
        scoring_s = time.monotonic() - t0
        with ModelServerProcess(base.resolve(), poll_wait_s=30.0) as server:
            served = run_load(server.target, texts, batch_size=args.batch_size, clients=1, duration_s=args.duration_s, warmup_s=args.warmup_s)
        profile = info.get("profile")
        train_s, train_cpu = fresh_train_seconds(info)
        teachers_s, teachers_cpu = teacher_seconds(info)
        rows.append({
            "name": name,
            "version_dir": str(version_dir),
            "profile": profile.get("name") if isinstance(profile, dict) else profile,
            "encoder": f"{profile.get('num_layers')} x {profile.get('hidden_dim')}" if isinstance(profile, dict) else None,
            "pretrained": bool(info.get("pretrained")),
            "distilled": bool(info.get("distillation")),
            "test_mean_roc_auc": mean_auc(roc_aucs(labels, test.labels, probs[name])),
            "serving_comments_per_s": served["sequences_per_s"],
            "serving_p50_ms": served["p50_ms"],
            "serving_errors": served["errors"],
            "train_seconds": train_s,
            "train_seconds_with_teachers": train_s + teachers_s,
            "train_cpu_seconds": train_cpu,
            "train_cpu_seconds_with_teachers": None if train_cpu is None or teachers_cpu is None else train_cpu + teachers_cpu,
            "size_mb": round(sum(f.stat().st_size for f in version_dir.rglob("*") if f.is_file()) / 1e6, 1),
            "in_process_scoring_s": round(scoring_s, 1),
            "measured_at": measured_at,
        })
        print(f"  {name}: AUC {rows[-1]['test_mean_roc_auc']:.4f}, {served['sequences_per_s']:.0f} comments/s", file=sys.stderr, flush=True)

    reference = next(r for r in rows if r["name"] == args.reference)
    for r in rows:
        if r is reference:
            continue
        d = paired_bootstrap(test.labels, probs[args.reference], probs[r["name"]], resamples=args.resamples)
        r["vs_reference"] = {"difference": d.difference, "low": d.low, "high": d.high, "share_not_better": d.share_not_better}
        r["throughput_vs_reference"] = r["serving_comments_per_s"] / reference["serving_comments_per_s"]

    print(f"\nquality-speed frontier (reference: {args.reference}; differences: paired bootstrap 95% CI, {args.resamples} resamples)")
    print(f"{'model':>18} {'test AUC':>9} {'vs ref [95% CI]':>28} {'comments/s':>11} {'x ref':>6} {'train min':>10} {'+teachers':>10} "
          f"{'CPU min':>8} {'+teachers':>10} {'MB':>6}")

    def minutes(seconds: float | None) -> str:
        return "?" if seconds is None else f"{seconds / 60:.1f}"

    for r in rows:
        v = r.get("vs_reference")
        ci = f"{v['difference']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]" if v else "(reference)"
        print(f"{r['name']:>18} {r['test_mean_roc_auc']:>9.4f} {ci:>28} {r['serving_comments_per_s']:>11.0f} "
              f"{r.get('throughput_vs_reference', 1.0):>6.2f} {minutes(r['train_seconds']):>10} {minutes(r['train_seconds_with_teachers']):>10} "
              f"{minutes(r['train_cpu_seconds']):>8} {minutes(r['train_cpu_seconds_with_teachers']):>10} {r['size_mb']:>6.1f}")
    report = {"reference": args.reference, "test_rows": len(test), "batch_size": args.batch_size, "duration_s": args.duration_s,
              "resamples": args.resamples, "cpus": os.cpu_count(), "measured_at": measured_at, "models": rows}
    if earlier is not None:
        try:
            report = merge_reports(earlier, report)
        except ValueError as e:
            print(f"bench_frontier: not merged into {args.merge_into}: {e}", file=sys.stderr)
            return 2
        print(f"merged into {args.merge_into}: {', '.join(r['name'] for r in report['models'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.chart:
        draw_chart(report, args.chart)
    return 0


def merge_reports(earlier: dict, new: dict) -> dict:
    """`earlier` with `new`'s models added (a row of the same name replaced). Each row keeps the
    throughput ratio measured beside the reference in its own run, since throughput on a shared
    machine is comparable only within one run. Refused (ValueError) when the two runs' settings
    or reference models differ: scoring is deterministic, so the same reference model has the
    same test score to the last digit."""
    if not isinstance(earlier, dict) or not isinstance(earlier.get("models"), list) \
            or not all(isinstance(r, dict) and isinstance(r.get("test_mean_roc_auc"), float) for r in earlier["models"]):
        raise ValueError("not a report this script wrote (an object whose models are rows with a test mean ROC AUC)")
    for key in ("reference", "test_rows", "batch_size", "cpus"):
        if earlier.get(key) != new.get(key):
            raise ValueError(f"{key} differs: {earlier.get(key)!r} in the earlier report, {new.get(key)!r} in this run")
    ref = new["reference"]
    old_ref = next((r for r in earlier["models"] if r.get("name") == ref), None)
    if old_ref is None:
        raise ValueError(f"the earlier report has no {ref!r} row")
    new_ref = next((r for r in new["models"] if r["name"] == ref), None)
    if new_ref is None:  # the check before measuring: settings and the reference row only
        return earlier
    if abs(old_ref["test_mean_roc_auc"] - new_ref["test_mean_roc_auc"]) > 1e-9:
        raise ValueError(f"the reference {ref!r} is another model: test mean ROC AUC {old_ref['test_mean_roc_auc']:.6f} "
                         f"in the earlier report, {new_ref['test_mean_roc_auc']:.6f} in this run")
    added = {r["name"]: dict(r, reference_serving_comments_per_s=new_ref["serving_comments_per_s"])
             for r in new["models"] if r["name"] != ref}
    models = [added.pop(r.get("name"), r) for r in earlier["models"]] + list(added.values())
    return dict(earlier, models=models)


def draw_chart(report: dict, path: Path) -> None:
    """Two panels, quality against serving throughput and against training time; each point says
    its difference from the reference with the 95% interval. A model far below the others (tiny)
    sits on the bottom edge with its value written, so it does not flatten the rest."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    aucs = sorted(r["test_mean_roc_auc"] for r in rows)
    close = [a for a in aucs if a >= aucs[-1] - 0.03]
    low, high = min(close) - 0.003, max(close) + 0.002
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = (("serving_comments_per_s", f"serving throughput, comments/s (esp serve, batch {report['batch_size']}, {report['cpus']} cores)"),
              ("train_seconds_with_teachers", "training time, minutes on 2 shared cores (distilled: soft targets and teachers' training included)"))
    for ax, (key, xlabel) in zip(axes, panels):
        # The throughput panel's labels carry the interval (about 0.7 decades wide at this size); the
        # training-time panel's only name and AUC, so its crowded right-hand side stays legible.
        with_interval = key == "serving_comments_per_s"
        width = 0.7 if with_interval else 0.4

        # A label goes below its point when a better model close by has its label above (demo under
        # its distilled student, a minilm fold under the full minilm), so neighbours do not print over
        # each other; decided from the best model down, so a third close model goes above again.
        below_names: set[str] = set()
        for r in sorted(rows, key=lambda r: -r["test_mean_roc_auc"]):
            if any(o is not r and o[key] and r[key] and abs(math.log10(o[key] / r[key])) < width and o["name"] not in below_names
                   and 0 < o["test_mean_roc_auc"] - r["test_mean_roc_auc"] < (high - low) / 6 for o in rows):
                below_names.add(r["name"])

        def below(r: dict) -> bool:
            return r["name"] in below_names

        for r in rows:
            if r[key] is None:
                continue
            x = r[key] / 60 if key.startswith("train") else r[key]
            y = r["test_mean_roc_auc"]
            clipped = y < low
            colour = "tab:red" if r["name"] == report["reference"] else ("tab:purple" if r["distilled"] else ("tab:green" if r["pretrained"] else "tab:blue"))
            ax.scatter([x], [max(y, low)], s=60, color=colour, marker="v" if clipped else "o", zorder=3)
            v = r.get("vs_reference")
            note = f"{r['name']}\n{y:.4f}" + (f"\n{v['difference']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]" if v and with_interval and not clipped else "")
            # A point right beside it on the right (the two distilled students' training times): label on the left.
            left = not with_interval and any(o is not r and o[key] and r[key] and 0 < math.log10(o[key] / r[key]) < 0.1 for o in rows)
            ax.annotate(note, (x, max(y, low)), textcoords="offset points", xytext=(-6 if left else 6, -26 if below(r) else 4),
                        ha="right" if left else "left", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylim(low, high)
    axes[0].set_ylabel("test mean ROC AUC (5,345 comments)")
    fig.suptitle(f"ESP models: quality against speed and training cost (differences vs {report['reference']}, paired bootstrap 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
