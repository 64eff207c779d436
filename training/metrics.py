"""Metrics and decision thresholds: ROC/PR AUC per label, and thresholds at natural prevalence.

The shipped data over-represents toxic comments (23.4% toxic against about 9.6% in Jigsaw), so a
precision measured on it is optimistic. Rows are reweighted by their `toxic` label to the natural
rate; because the other labels are almost all subsets of toxic, the same row weights bring every
label near its natural rate too (obscene 12.4% -> 5.1%, insult 11.7% -> 4.8%, threat 0.70% ->
0.29%; Jigsaw's full training set has 5.3%, 4.9%, 0.30%). Thresholds are chosen on dev with those
weights, so a precision claimed for a threshold holds on production-like traffic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

NATURAL_TOXIC_PREVALENCE = 0.096
DEFAULT_TARGET_PRECISION = 0.8


def roc_aucs(labels: Sequence[str], y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC AUC per label (NaN where a label has only one class in `y`)."""
    out = {}
    for j, name in enumerate(labels):
        out[name] = float(roc_auc_score(y[:, j], p[:, j])) if 0 < y[:, j].sum() < len(y) else math.nan
    return out


def pr_aucs(labels: Sequence[str], y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    out = {}
    for j, name in enumerate(labels):
        ok = 0 < y[:, j].sum() < len(y)
        out[name] = float(average_precision_score(y[:, j], p[:, j], sample_weight=weights)) if ok else math.nan
    return out


def mean_auc(aucs: dict[str, float]) -> float:
    """The Jigsaw metric: the mean of the column-wise ROC AUCs (labels without both classes left out)."""
    vals = [v for v in aucs.values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def natural_weights(y_toxic: np.ndarray, natural_prevalence: float = NATURAL_TOXIC_PREVALENCE) -> np.ndarray:
    """Row weights that make `toxic` occur at its natural rate (and the subset labels near theirs)."""
    y_toxic = np.asarray(y_toxic, dtype=np.float64)
    data_prevalence = float(y_toxic.mean()) if len(y_toxic) else 0.0
    if not 0.0 < data_prevalence < 1.0:
        return np.ones_like(y_toxic)
    w_pos = natural_prevalence / data_prevalence
    w_neg = (1.0 - natural_prevalence) / (1.0 - data_prevalence)
    return np.where(y_toxic > 0.5, w_pos, w_neg)


@dataclasses.dataclass(frozen=True)
class Threshold:
    value: float
    rule: str  # "precision>=P" when the target precision is reachable, otherwise "max_f1"
    precision: float
    recall: float


def choose_threshold(y: np.ndarray, p: np.ndarray, weights: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION) -> Threshold:
    """The lowest threshold whose weighted precision reaches the target (the most recall at that
    precision); where no threshold reaches it, the weighted-F1-maximising one.

    Thresholds sit halfway between adjacent distinct scores, so the chosen value does not flip the
    row it was computed from on a float round-off.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if y.sum() == 0 or len(y) == 0:
        return Threshold(0.5, "default_no_positives", math.nan, math.nan)
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted, w_sorted = p[order], y[order], w[order]
    tp = np.cumsum(w_sorted * y_sorted)
    fp = np.cumsum(w_sorted * (1.0 - y_sorted))
    # Only cut where the score changes: a threshold cannot separate equal scores.
    last_of_run = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    tp, fp, cut_scores = tp[last_of_run], fp[last_of_run], p_sorted[last_of_run]
    positives = float((w * y).sum())
    precision = tp / np.maximum(tp + fp, 1e-12)
    recall = tp / positives
    next_scores = np.r_[cut_scores[1:], 0.0]
    # Flag rows with score >= threshold: halfway between this run's score and the next lower one.
    thresholds = (cut_scores + next_scores) / 2.0
    reach = np.nonzero(precision >= target_precision)[0]
    if len(reach):
        i = int(reach[-1])  # deepest cut (most recall) that still meets the precision target
        rule = f"precision>={target_precision:g}"
    else:
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        i = int(np.argmax(f1))
        rule = "max_f1"
    return Threshold(float(thresholds[i]), rule, float(precision[i]), float(recall[i]))


def precision_recall_at(y: np.ndarray, p: np.ndarray, weights: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = p >= threshold
    tp = float((weights * y * flagged).sum())
    fp = float((weights * (1 - y) * flagged).sum())
    pos = float((weights * y).sum())
    return (tp / (tp + fp) if tp + fp else math.nan), (tp / pos if pos else math.nan)
