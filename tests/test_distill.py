"""Distillation on the tiny profile: cross-fit teachers, soft targets from the teacher that held
each row out, the student's loss and its export (training/distill.py, `esp train --teacher`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.distill import Teacher, TeacherError, assign_rows, fold_mask, fold_of
from training.profiles import get_profile


@settings(max_examples=50, deadline=None)
@given(comment_id=st.text(min_size=1, max_size=40), folds=st.integers(2, 7))
def test_fold_of_is_a_stable_fold_number(comment_id: str, folds: int) -> None:
    k = fold_of(comment_id, folds)
    assert 1 <= k <= folds and fold_of(comment_id, folds) == k


def test_folds_are_balanced_and_independent_of_the_split() -> None:
    from beam_jobs.prepare_data import split_of

    ids = [f"c{i}" for i in range(20_000)]
    first = fold_mask(ids, 1, 2)
    assert 0.48 < first.mean() < 0.52
    train_ids = [i for i in ids if split_of(i, 0.8, 0.1) == "train"]
    assert 0.48 < fold_mask(train_ids, 1, 2).mean() < 0.52  # the split does not skew the folds


def _teacher(fold: int | None, folds: int = 2) -> Teacher:
    return Teacher(Path(f"/t{fold}"), ("toxic",), (fold, folds) if fold else None, "tiny")


def test_each_row_goes_to_the_teacher_that_held_it_out() -> None:
    ids = [f"r{i}" for i in range(1000)]
    masks = assign_rows([_teacher(1), _teacher(2)], ids, allow_in_sample=False)
    assert (masks[0] ^ masks[1]).all()  # every row exactly once
    assert (masks[0] == fold_mask(ids, 1, 2)).all()


def test_rows_no_teacher_held_out_are_an_error() -> None:
    with pytest.raises(TeacherError, match="have no teacher that held them out"):
        assign_rows([_teacher(1)], [f"r{i}" for i in range(100)], allow_in_sample=False)


def test_an_in_sample_teacher_is_refused_unless_allowed() -> None:
    ids = [f"r{i}" for i in range(100)]
    with pytest.raises(TeacherError, match="trained on every training row"):
        assign_rows([_teacher(None)], ids, allow_in_sample=False)
    # Allowed, it only fills the rows the cross-fit teachers leave.
    masks = assign_rows([_teacher(1), _teacher(None)], ids, allow_in_sample=True)
    assert (masks[1] == ~fold_mask(ids, 1, 2)).all()


def test_distillation_loss_blends_labels_and_soft_targets() -> None:
    from training.train import _weighted_bce

    def bce(t, z, w=1.0):
        return -(w * t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))

    pos_weight = np.array([2.0, 1.0], np.float32)
    z = np.array([[0.3, -1.2], [2.0, 0.1]], np.float32)
    hard = np.array([[1, 0], [0, 1]], np.float32)
    soft = np.array([[0.7, 0.2], [0.4, 0.9]], np.float32)
    alpha = 0.25
    got = np.asarray(_weighted_bce(pos_weight, alpha)(np.concatenate([hard, soft], 1), z))
    want = ((1 - alpha) * bce(hard, z, pos_weight) + alpha * bce(soft, z)).mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(_weighted_bce(pos_weight)(hard, z)), bce(hard, z, pos_weight).mean(axis=1), rtol=1e-5)


@pytest.fixture(scope="module")
def cross_fit_teachers(tiny_training, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny teachers, each trained on one half of the training split (by fold)."""
    from training.pipeline import train_and_export

    root = tmp_path_factory.mktemp("teachers")
    profile = dataclasses.replace(get_profile("tiny"), max_train_rows=0)
    out = []
    for k in (1, 2):
        result = train_and_export(data_dir=str(tiny_training.data_dir), profile=profile, work_dir=str(root / f"w{k}"),
                                  export_base_path=str(root / f"fold{k}"), export_version=1, seed=k, cross_fit=(k, 2),
                                  report_dir=None, progress=False)
        out.append(Path(result["version_dir"]))
    return out


def test_a_cross_fit_teacher_trains_only_outside_its_fold(cross_fit_teachers, tiny_training) -> None:
    from training import records

    train = records.read_split(str(tiny_training.data_dir), "train", 6)
    held_out = int(fold_mask(train.ids, 1, 2).sum())
    info = json.loads((cross_fit_teachers[0] / "assets.extra" / "esp_model_info.json").read_text())
    assert info["cross_fit"] == {"fold": 1, "folds": 2}
    assert info["train_rows"] == len(train) - held_out


def test_soft_targets_come_from_the_teacher_that_did_not_train_on_the_row(cross_fit_teachers, tiny_training, tmp_path: Path) -> None:
    from training import records
    from training.distill import soft_targets
    from training.evaluate import score_saved_model

    train = records.read_split(str(tiny_training.data_dir), "train", 6).head(300)
    labels = records.read_stats(str(tiny_training.data_dir))["labels"]
    targets, summary = soft_targets([str(p) for p in cross_fit_teachers], train.ids, train.texts, labels, cache_dir=tmp_path)
    assert targets.shape == (300, 6) and sum(t["rows"] for t in summary["teachers"]) == 300
    in_fold1 = fold_mask(train.ids, 1, 2)
    _, p1, _ = score_saved_model(cross_fit_teachers[0], train.texts)
    _, p2, _ = score_saved_model(cross_fit_teachers[1], train.texts)
    np.testing.assert_allclose(targets[in_fold1], p1[in_fold1], atol=1e-6)
    np.testing.assert_allclose(targets[~in_fold1], p2[~in_fold1], atol=1e-6)
    assert np.abs(p1 - p2).max() > 1e-3  # the two teachers differ, so the check above means something
    # A second call reads the cache: same numbers.
    again, summary2 = soft_targets([str(p) for p in cross_fit_teachers], train.ids, train.texts, labels, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, targets)
    assert summary2["cache"] == summary["cache"]


def test_cli_distils_the_teachers_into_a_student(cross_fit_teachers, tiny_training, tmp_path: Path) -> None:
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    base = tmp_path / "student"
    cmd = [sys.executable, "-m", "esp.cli.main", "train", "--profile", "tiny", "--teacher", ",".join(str(p) for p in cross_fit_teachers),
           "--distill-alpha", "0.7", "--data-dir", str(tiny_training.data_dir), "--export-base-path", str(base),
           "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--report-dir", str(tmp_path / "report"),
           "--no-baselines", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((base / "1" / "assets.extra" / "esp_model_info.json").read_text())
    d = info["distillation"]
    assert d["alpha"] == 0.7 and d["in_sample_rows"] == 0
    assert [t["cross_fit"] for t in d["teachers"]] == [{"fold": 1, "folds": 2}, {"fold": 2, "folds": 2}]
    assert sum(t["rows"] for t in d["teachers"]) == info["train_rows"]
    assert info["timings"]["soft_targets"] >= 0
    fn = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    assert fn(text=tf.constant(["a test comment"]))["toxic"].shape == (1,)

    # One teacher alone leaves half the rows without an out-of-fold target: refused in one line.
    one = cmd[:7] + [str(cross_fit_teachers[0])] + cmd[8:]
    bad = subprocess.run(one, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "held them out" in bad.stderr and "Traceback" not in bad.stderr

    # Distillation options without a teacher: refused in one line before any work.
    alone = cmd[:6] + ["--distill-wide", "--data-dir", str(tiny_training.data_dir)]
    bad = subprocess.run(alone, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "distill_wide needs --teacher" in bad.stderr and "Traceback" not in bad.stderr
