"""The paired bootstrap of the difference in mean ROC AUC (training/compare.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from training.compare import _grouped_auc, paired_bootstrap, weighted_mean_auc


def _data(n: int = 3000, seed: int = 0, labels: int = 3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < np.linspace(0.25, 0.02, labels)).astype(float)
    # Rounded scores: many ties, which the grouped AUC must count as halves, like sklearn.
    p = np.round(np.clip(0.35 * y + 0.8 * rng.random((n, labels)), 0, 1), 2)
    return y, p, rng


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 300))
def test_weighted_auc_is_sklearns_auc_on_the_resampled_rows(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    p = np.round(rng.random(n), 1)
    rows = rng.integers(0, n, n)
    counts = np.bincount(rows, minlength=n).astype(float)[None, :]
    ours = _grouped_auc(y, p, counts)[0]
    if 0 < y[rows].sum() < n:
        assert ours == pytest.approx(roc_auc_score(y[rows], p[rows]), abs=1e-12)
    else:
        assert np.isnan(ours)


def test_mean_auc_leaves_out_labels_without_both_classes() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], float)
    p = np.array([[0.9, 0.1], [0.2, 0.5], [0.4, 0.3], [0.5, 0.2]])
    assert weighted_mean_auc(y, p, np.ones((1, 4)))[0] == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]))


def test_identical_models_differ_by_exactly_nothing() -> None:
    y, p, _ = _data()
    r = paired_bootstrap(y, p, p.copy(), resamples=300)
    assert r.difference == 0.0 and r.low == 0.0 and r.high == 0.0
    assert not r.above_zero


def test_a_better_model_has_its_interval_above_zero_and_a_worse_one_below() -> None:
    y, p, rng = _data()
    better = np.clip(p + 0.05 * y + rng.normal(0, 0.01, p.shape), 0, 1)
    up = paired_bootstrap(y, p, better, resamples=500)
    assert up.difference > 0 and up.above_zero and up.low <= up.difference <= up.high
    assert up.share_not_better == 0.0
    down = paired_bootstrap(y, better, p, resamples=500)
    assert down.high < 0 and down.difference == pytest.approx(-up.difference)


def test_pairing_makes_a_small_shared_improvement_significant() -> None:
    """Two models that agree except for a small, consistent gain: resampled together, the gain is
    clear; the width of the interval is far below the uncertainty of either AUC on its own (which
    is what resampling the models separately would give)."""
    y, p, rng = _data(n=4000, seed=3)
    b = np.clip(p + 0.004 * y + rng.normal(0, 0.002, p.shape), 0, 1)
    r = paired_bootstrap(y, p, b, resamples=600)
    assert r.above_zero
    alone = [paired_bootstrap(y, np.full_like(p, 0.5), p, resamples=600, seed=1)]
    marginal_width = alone[0].high - alone[0].low  # the interval of p's own AUC over a constant
    assert (r.high - r.low) < marginal_width / 4


def test_noise_is_not_called_a_difference() -> None:
    y, p, rng = _data(seed=5)
    other = np.clip(p + rng.normal(0, 0.05, p.shape), 0, 1)  # no signal added, only noise
    r = paired_bootstrap(y, p, other, resamples=500)
    assert r.low < 0 < r.high or abs(r.difference) < 0.01


def test_the_interval_is_reproducible_and_seeded() -> None:
    y, p, rng = _data()
    b = np.clip(p + 0.01 * y + rng.normal(0, 0.02, p.shape), 0, 1)
    assert paired_bootstrap(y, p, b, resamples=200, seed=7) == paired_bootstrap(y, p, b, resamples=200, seed=7)
    assert paired_bootstrap(y, p, b, resamples=200, seed=7).low != paired_bootstrap(y, p, b, resamples=200, seed=8).low


def test_rows_must_be_the_same_for_both_models() -> None:
    y, p, _ = _data(n=100)
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap(y, p, p[:-1])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap(y, p, np.where(p > 0.5, np.nan, p))
