"""Is model B better than model A? The paired bootstrap of the difference in mean ROC AUC.

Both models are scored on the same test rows. Each bootstrap replicate draws the rows with
replacement once and uses that one draw for both models, so what the two share (a hard comment
both miss, a rare label with few positives) cancels out of the difference: the interval is about
the models, not about which rows happened to be drawn. Resampling each model separately would
give an interval several times wider, and most real differences between ESP's models would look
like noise.

A replicate is a vector of row counts (how often each row was drawn). ROC AUC under such weights
is computed from one sort per model and label: with rows sorted by score and grouped by equal
score, AUC = sum over groups of (positive weight in the group) x (negative weight below it + half
the negative weight tied with it), over (all positive weight x all negative weight): exactly
scikit-learn's roc_auc_score on the resampled rows (the tests check this), but thousands of
replicates take seconds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from training import metrics as M


class NotComparable(ValueError):
    """The two models cannot be compared on these rows (other labels, other rows)."""


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean ROC AUC of B minus that of A on the same rows, with a bootstrap confidence interval."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    mean_auc_a: float
    mean_auc_b: float
    # Share of replicates where B was not better: a one-sided bootstrap p-value for "B > A".
    share_not_better: float

    @property
    def above_zero(self) -> bool:
        return self.low > 0.0

    def describe(self) -> str:
        return f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({self.confidence:.0%} CI, {self.resamples} paired resamples)"


def _grouped_auc(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of one label under each row of `counts` ([replicates, rows]); NaN where a replicate
    has no positive or no negative weight."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = y[order] > 0.5
    starts = np.r_[0, np.nonzero(s[1:] != s[:-1])[0] + 1]  # first row of each run of equal scores
    c = counts[:, order]
    pos_w = np.add.reduceat(np.where(pos, c, 0.0), starts, axis=1)
    neg_w = np.add.reduceat(np.where(pos, 0.0, c), starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    numerator = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    denominator = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def weighted_mean_auc(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The Jigsaw metric (mean of the per-label ROC AUCs, labels without both classes left out)
    under each row of `counts`: [replicates]."""
    per_label = np.stack([_grouped_auc(y[:, j], p[:, j], counts) for j in range(y.shape[1])], axis=1)
    with np.errstate(invalid="ignore"):
        present = ~np.isnan(per_label)
        return np.where(present.any(axis=1), np.nansum(per_label, axis=1) / np.maximum(present.sum(axis=1), 1), np.nan)


def paired_bootstrap(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 200,
) -> PairedDifference:
    """mean ROC AUC(B) - mean ROC AUC(A) on rows `y` [rows, labels], with its percentile interval."""
    y = np.asarray(y, dtype=np.float64)
    p_a = np.asarray(p_a, dtype=np.float64)
    p_b = np.asarray(p_b, dtype=np.float64)
    if y.ndim != 2 or p_a.shape != y.shape or p_b.shape != y.shape:
        raise NotComparable(f"need the same rows and labels for both models: y {y.shape}, A {p_a.shape}, B {p_b.shape}")
    if not np.isfinite(p_a).all() or not np.isfinite(p_b).all():
        raise ValueError("probabilities must be finite")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("need resamples >= 1 and 0 < confidence < 1")
    labels = [str(j) for j in range(y.shape[1])]
    auc_a = M.mean_auc(M.roc_aucs(labels, y, p_a))
    auc_b = M.mean_auc(M.roc_aucs(labels, y, p_b))
    n = len(y)
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        diffs.append(weighted_mean_auc(y, p_b, counts) - weighted_mean_auc(y, p_a, counts))
    d = np.concatenate(diffs)
    d = d[~np.isnan(d)]
    tail = (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.quantile(d, [tail, 1.0 - tail]))
    return PairedDifference(
        difference=float(auc_b - auc_a),
        low=low,
        high=high,
        confidence=confidence,
        resamples=len(d),
        mean_auc_a=float(auc_a),
        mean_auc_b=float(auc_b),
        share_not_better=float((d <= 0.0).mean()) if len(d) else math.nan,
    )

