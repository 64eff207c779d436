"""`esp train` end to end: train a profile, choose thresholds on dev, export, write the report.

Kept apart from the CLI so tests and the fixture run exactly what the command runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training import metrics as M

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample_comments.jsonl"


def choose_thresholds(labels, dev_labels: np.ndarray, dev_probs: np.ndarray, target_precision: float, natural_prevalence: float) -> dict[str, M.Threshold]:
    toxic = dev_labels[:, list(labels).index("toxic")] if "toxic" in labels else np.zeros(len(dev_labels))
    weights = M.natural_weights(toxic, natural_prevalence)
    return {l: M.choose_threshold(dev_labels[:, j], dev_probs[:, j], weights, target_precision) for j, l in enumerate(labels)}


def train_and_export(
    *,
    data_dir: str,
    profile,
    work_dir: str,
    export_base_path: str,
    export_version: int | None = None,
    seed: int = 42,
    pretrained: str | None = None,
    pretrained_cache_dir: str | None = None,
    cache_dir: str | None = None,
    threads: int = 0,
    model_name: str = "bert",
    teachers: tuple[str, ...] = (),
    allow_in_sample_teacher: bool = False,
    cross_fit: tuple[int, int] | None = None,
    target_precision: float = M.DEFAULT_TARGET_PRECISION,
    natural_prevalence: float = M.NATURAL_TOXIC_PREVALENCE,
    report_dir: str | None = None,
    baselines: bool = True,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Returns {"version_dir", "train_seconds", "best_epoch", "dev_mean_roc_auc", "test": {...}, "report": {...}|None}."""
    from training import records
    from training.evaluate import evaluate, label_metrics
    from training.export import export_model
    from training.train import encode, predict_probabilities, train

    started = time.monotonic()
    cpu_started = _cpu_seconds()
    result = train(data_dir, profile, work_dir, seed=seed, pretrained=pretrained, pretrained_cache_dir=pretrained_cache_dir, cache_dir=cache_dir,
                   threads=threads, progress=progress, on_epoch=on_epoch, teachers=teachers, allow_in_sample_teacher=allow_in_sample_teacher,
                   cross_fit=cross_fit)
    train_wall_seconds = time.monotonic() - started
    train_cpu_seconds = _cpu_seconds() - cpu_started
    labels = result.labels
    thresholds = choose_thresholds(labels, result.dev_labels, result.dev_probabilities, target_precision, natural_prevalence)

    test = records.read_split(data_dir, "test", len(labels)).head(result.profile.max_dev_rows)
    test_probs = predict_probabilities(result.model, encode(result.preprocessor, test.texts, test.labels))
    toxic = test.labels[:, list(labels).index("toxic")] if "toxic" in labels else np.zeros(len(test))
    test_metrics = label_metrics(labels, test.labels, test_probs, M.natural_weights(toxic, natural_prevalence))
    dev_auc = M.mean_auc(M.roc_aucs(labels, result.dev_labels, result.dev_probabilities))

    info = {
        "model_name": model_name,
        "profile": {k: v for k, v in dataclasses.asdict(result.profile).items()},
        "seed": seed,
        "pretrained": result.pretrained,
        "pretrained_provenance": _provenance(result.pretrained),
        "best_epoch": result.best_epoch,
        "wide_only_dev_mean_roc_auc": result.wide_only_dev_auc,
        "evaluations_run": len(result.history),
        "train_seconds": round(result.train_seconds, 1),
        # Everything before the export: reading, teachers' soft targets, tokenising, the wide fit,
        # the encoder's epochs and the final dev pass. What the frontier calls training time.
        "train_wall_seconds": round(train_wall_seconds, 1),
        # CPU time of all threads over the same span: unlike wall time, it barely depends on what
        # else the machine runs, so costs measured on a busy shared machine stay comparable.
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "timings": result.timings,
        "cross_fit": {"fold": result.cross_fit[0], "folds": result.cross_fit[1]} if result.cross_fit else None,
        "distillation": result.distillation,
        "train_rows": result.train_rows,
        "threshold_rules": {l: t.rule for l, t in thresholds.items()},
        "threshold_dev_precision_natural": {l: t.precision for l, t in thresholds.items()},
        "threshold_dev_recall_natural": {l: t.recall for l, t in thresholds.items()},
        "target_precision": target_precision,
        "natural_toxic_prevalence": natural_prevalence,
        "metrics": {"split": "test", "rows": len(test), "dev_mean_roc_auc": dev_auc, **test_metrics},
        "data_stats": records.read_stats(data_dir).get("rows"),
    }
    version_dir = export_model(
        preprocessor=result.preprocessor,
        model=result.model,
        labels=labels,
        thresholds={l: t.value for l, t in thresholds.items()},
        base_path=export_base_path,
        version=export_version,
        model_info=_json_safe(info),
        model_name=model_name,
        overwrite=overwrite,
    )
    report = None
    if report_dir:
        report = evaluate(version_dir, data_dir, report_dir, baselines=baselines, natural_prevalence=natural_prevalence,
                          history=result.history, sample_path=DEFAULT_SAMPLE, progress=progress)
    return {
        "version_dir": str(version_dir),
        "train_seconds": result.train_seconds,
        "total_seconds": time.monotonic() - started,
        "best_epoch": result.best_epoch,
        "dev_mean_roc_auc": dev_auc,
        "test": test_metrics,
        "thresholds": {l: dataclasses.asdict(t) for l, t in thresholds.items()},
        "report": report,
        "train_result": result,
    }


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _provenance(pretrained: str | None) -> dict | None:
    """Where fetched weights came from (training.weights writes it), for the model info.

    Only when it describes the weights trained from: the file may be in a user's directory, read
    after the whole training, where one that is not JSON crashed the export and one copied beside
    other weights recorded the pinned hash for them.
    """
    import json

    from training.weights import PROVENANCE_FILE, sha256_file

    path = Path(pretrained or "") / PROVENANCE_FILE
    if not pretrained or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        record = None
    # The file's own name only (never a path it chose), within the directory trained from.
    weights = Path(pretrained) / Path(str(record.get("weights_file"))).name if isinstance(record, dict) else None
    if weights is None or not weights.is_file() or sha256_file(weights) != record.get("weights_sha256"):
        logger.warning("%s does not describe the weights in %s: not recorded in the model info", path, pretrained)
        return None
    return record


def _json_safe(obj):
    import math

    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
