"""Training: artifacts, reproducibility, thresholds at natural prevalence, and fine-tuning from a
pretrained BERT (a keras-hub preset and a Google-format TF checkpoint the tests save themselves)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.metrics import choose_threshold, natural_weights, precision_recall_at
from training.profiles import get_profile

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


def test_tiny_training_leaves_history_and_checkpoints(tiny_training) -> None:
    result = tiny_training.output["train_result"]
    assert [h["epoch"] for h in result.history] == [1]
    assert 0.0 < result.history[0]["dev_mean_roc_auc"] <= 1.0
    ckpts = tiny_training.work_dir / "checkpoints"
    assert (ckpts / "best.weights.h5").is_file() and (ckpts / "epoch-001.weights.h5").is_file()
    assert json.loads((tiny_training.work_dir / "history.json").read_text())[0]["epoch"] == 1


def test_same_seed_same_model(tiny_training, tmp_path: Path) -> None:
    from training.train import train

    # The fixture's run is the first of the pair: it trained the tiny profile with seed 7 earlier in
    # this process, so the rerun must match it whatever ran in between. (Each run costs ~17 s of
    # fixed set-up, whatever the row count.)
    first = tiny_training.output["train_result"]
    again = train(str(tiny_training.data_dir), get_profile("tiny"), str(tmp_path / "again"), seed=first.seed, progress=False)
    np.testing.assert_allclose(again.dev_probabilities, first.dev_probabilities, atol=1e-6)
    other = train(str(tiny_training.data_dir), get_profile("tiny"), str(tmp_path / "other"), seed=first.seed + 1, progress=False)
    assert np.abs(other.dev_probabilities - first.dev_probabilities).max() > 1e-4


def test_natural_weights_bring_toxic_to_its_natural_rate() -> None:
    y = np.array([1] * 234 + [0] * 766)
    w = natural_weights(y, 0.096)
    assert (w * y).sum() / w.sum() == pytest.approx(0.096)
    assert w.sum() == pytest.approx(len(y))


def test_threshold_meets_the_target_precision_with_the_most_recall() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.25).astype(float)
    p = np.clip(y * 0.35 + rng.random(4000) * 0.65, 0, 1)
    w = natural_weights(y, 0.096)
    t = choose_threshold(y, p, w, 0.8)
    assert t.rule == "precision>=0.8"
    prec, rec = precision_recall_at(y, p, w, t.value)
    assert prec >= 0.8 and rec == pytest.approx(t.recall)
    # Any lower threshold with more recall falls below the target.
    lower = np.sort(p[p < t.value])[-1] if (p < t.value).any() else None
    if lower is not None:
        assert precision_recall_at(y, p, w, lower)[0] < 0.8
    # At natural prevalence the same threshold shows lower precision than on the raw sample.
    assert precision_recall_at(y, p, np.ones_like(y), t.value)[0] > prec
    # Unreachable target (the top score is a negative): fall back to the best F1.
    fallback = choose_threshold(np.array([0, 1, 0, 1.0]), np.array([0.9, 0.8, 0.7, 0.6]), np.ones(4), 0.9)
    assert fallback.rule == "max_f1" and fallback.value == pytest.approx(0.3) and fallback.recall == 1.0


def _tiny_backbone(vocab_size: int):
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=vocab_size, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=64
    )


def _vocab_lines() -> str:
    from training.preprocess import shipped_vocab_path

    return Path(shipped_vocab_path()).read_text(encoding="utf-8")


def test_fine_tunes_from_a_keras_hub_preset(tiny_training, tmp_path: Path) -> None:
    import keras

    from training.pretrained import load_pretrained
    from training.train import train

    keras.utils.set_random_seed(3)
    vocab = _vocab_lines()
    source = _tiny_backbone(len(vocab.splitlines()))
    preset = tmp_path / "preset"
    source.save_to_preset(str(preset))
    (preset / "assets" / "tokenizer").mkdir(parents=True)
    (preset / "assets" / "tokenizer" / "vocabulary.txt").write_text(vocab, encoding="utf-8")

    loaded, vocab_path = load_pretrained(preset)
    assert Path(vocab_path).parent.name == "tokenizer"
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    profile = dataclasses.replace(get_profile("tiny"), max_train_rows=200, max_dev_rows=100)
    result = train(str(tiny_training.data_dir), profile, str(tmp_path / "work"), seed=1, pretrained=str(preset), progress=False)
    assert result.profile.hidden_dim == 16  # the preset's size, not the tiny profile's 32
    assert result.pretrained == str(preset)
    assert np.isfinite(result.dev_probabilities).all()


def test_loads_a_google_format_tf_checkpoint(tmp_path: Path) -> None:
    import tensorflow as tf

    from training.pretrained import google_checkpoint_names, load_pretrained

    vocab = _vocab_lines()
    source = _tiny_backbone(len(vocab.splitlines()))
    for w in source.weights:  # distinct values everywhere, so a mix-up cannot pass
        w.assign(np.random.default_rng(len(w.path)).normal(size=tuple(w.shape)).astype("float32"))
    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    by_path = {w.path: w for w in source.weights}
    hidden = 16
    variables = {}
    for ours, theirs in google_checkpoint_names(source.num_layers).items():
        value = np.asarray(by_path[ours])
        # Google's layout: attention kernels [hidden, hidden], biases [hidden].
        if "/attention/self/" in theirs:
            value = value.reshape(hidden, hidden) if theirs.endswith("kernel") else value.reshape(hidden)
        elif "/attention/output/dense/kernel" in theirs:
            value = value.reshape(hidden, hidden)
        variables[theirs] = tf.Variable(value, name=theirs.replace("/", "_"))
    tf.compat.v1.train.Saver(var_list=variables).save(None, str(ckpt / "bert_model.ckpt"))
    (ckpt / "vocab.txt").write_text(vocab, encoding="utf-8")
    (ckpt / "bert_config.json").write_text(json.dumps({
        "vocab_size": len(vocab.splitlines()), "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 64, "hidden_dropout_prob": 0.1,
    }))

    loaded, vocab_path = load_pretrained(ckpt)
    assert Path(vocab_path).name == "vocab.txt"
    loaded_by_path = {w.path: w for w in loaded.weights}
    for path, w in by_path.items():
        np.testing.assert_array_equal(np.asarray(w), np.asarray(loaded_by_path[path]), err_msg=path)
    ids = np.array([[101, 7592, 102, 0]], np.int32)
    inputs = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": ids != 0}
    np.testing.assert_allclose(source(inputs)["pooled_output"], loaded(inputs)["pooled_output"], atol=1e-6)


def test_pretrained_path_errors_are_one_line(tmp_path: Path) -> None:
    from training.pretrained import PretrainedError, load_pretrained

    with pytest.raises(PretrainedError, match="not a Hugging Face BERT"):
        load_pretrained(tmp_path)
    (tmp_path / "bert_config.json").write_text("{}")
    with pytest.raises(PretrainedError, match="no vocabulary"):
        load_pretrained(tmp_path)


def test_cli_trains_exports_and_reports(tiny_training, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    base, report = tmp_path / "models", tmp_path / "report"
    cmd = [sys.executable, "-m", "esp.cli.main", "train", "--profile", "tiny", "--data-dir", str(tiny_training.data_dir),
           "--export-base-path", str(base), "--work-dir", str(tmp_path / "work"), "--report-dir", str(report), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1/1" in result.stderr and f"exported {base / '1'}" in result.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    for system in ("model", "tfidf_logreg", "tfidf_logreg_word", "profanity_check"):
        assert set(metrics[system]["roc_auc"]) == set(LABELS)
    assert "caveat" in metrics["profanity_check"]
    assert (report / "roc_curves.png").stat().st_size > 10_000 and (report / "training_curves.png").is_file()
    assert "| ESP model |" in (report / "report.md").read_text()


def test_cli_evaluate_reports_on_an_exported_model(tiny_training, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "evaluate", "--model-dir", str(tiny_training.base_path),
         "--compare-with", str(tiny_training.version_dir),
         "--data-dir", str(tiny_training.data_dir), "--report-dir", str(report), "--no-baselines", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    info = json.loads((tiny_training.version_dir / "assets.extra" / "esp_model_info.json").read_text())
    # Scored through the export, the test split gives the figure recorded at training time.
    assert metrics["model"]["mean_roc_auc"] == pytest.approx(info["metrics"]["mean_roc_auc"], abs=1e-4)
    assert f"{tiny_training.base_path / '1'}: test mean ROC AUC" in result.stdout
    assert "demo check:" in result.stdout
    # Compared with itself on the same rows: exactly no difference, and the interval says so.
    assert metrics["compared_with"]["difference"] == 0.0 and metrics["compared_with"]["low"] == 0.0
    assert "+0.0000, 95% CI [+0.0000, +0.0000]" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "esp.cli.main", "evaluate", "--model-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "no model version" in bad.stderr and "Traceback" not in bad.stderr


def test_wide_part_fitted_by_logistic_regression_with_out_of_fold_logits(tiny_training, tmp_path: Path) -> None:
    """The path the demo and default profiles take: the wide part is an sklearn logistic regression
    on the graph's own n-gram features (checked against sklearn on the same matrix), frozen, and
    the encoder trains against out-of-fold wide logits; the export scores with the full fit."""
    import tensorflow as tf

    from training.export import export_model
    from training.train import encode, predict_probabilities, train, wide_features

    profile = dataclasses.replace(get_profile("tiny"), wide_char_buckets=4096, wide_fit="logreg", wide_oof_folds=2,
                                  max_train_rows=300, max_dev_rows=150)
    result = train(str(tiny_training.data_dir), profile, str(tmp_path / "w"), seed=5, progress=False)
    assert result.wide_only_dev_auc is not None and 0.5 < result.wide_only_dev_auc <= 1.0
    wide = result.model.get_layer("wide")
    assert not wide.trainable

    # The in-graph wide part computes exactly sklearn's decision function on the same features.
    from training import records

    dev = records.read_split(str(tiny_training.data_dir), "dev", len(LABELS)).head(20)
    enc = encode(result.preprocessor, dev.texts, dev.labels)
    ids = tf.constant(np.stack([np.pad(r, (0, max(map(len, enc.wide_ids)) - len(r))) for r in enc.wide_ids]).astype("int32"))
    in_graph = np.asarray(wide(ids))
    x = wide_features(enc, np.asarray(wide.idf))
    np.testing.assert_allclose(in_graph, x @ np.asarray(wide.table) + np.asarray(wide.bias), atol=1e-4)
    assert np.abs(np.asarray(wide.table)).max() > 0

    version = export_model(preprocessor=result.preprocessor, model=result.model, labels=result.labels,
                           thresholds={l: 0.5 for l in result.labels}, base_path=tmp_path / "m")
    fn = tf.saved_model.load(str(version)).signatures["serving_default"]
    out = fn(text=tf.constant(dev.texts))
    np.testing.assert_allclose(np.stack([out[l].numpy() for l in LABELS], 1), predict_probabilities(result.model, enc), atol=1e-5)


def test_bfloat16_training_only_where_the_cpu_runs_it_natively() -> None:
    from training.model import training_dtype

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert training_dtype("mixed_bfloat16", avx2, gpu=False) == "float32"
    assert training_dtype("mixed_bfloat16", amx, gpu=False) == "mixed_bfloat16"
    assert training_dtype("mixed_bfloat16", avx2, gpu=True) == "mixed_bfloat16"
    assert training_dtype("float32", amx, gpu=False) == "float32"


@pytest.mark.parametrize("option, value, words", [("--epochs", "0", "epochs must be positive"), ("--threads", "-1", "threads must be >= 0")])
def test_cli_refuses_a_training_setting_out_of_range_in_one_line(tmp_path: Path, option: str, value: str, words: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    result = subprocess.run([sys.executable, "-m", "esp.cli.main", "train", option, value, "--data-dir", str(tmp_path)],
                            check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
