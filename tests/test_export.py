"""The exported model against docs/model-contract.md: signature, outputs, assets, ops, and any string."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training.export import MODEL_INFO_FILE, WARMUP_FILE, graph_ops, read_allowlist
from training.train import encode, predict_probabilities

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


@pytest.fixture(scope="module")
def serving_fn(tiny_training):
    return tf.saved_model.load(str(tiny_training.version_dir)).signatures["serving_default"]


def _score(fn, texts: list[str]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in fn(text=tf.constant(texts, tf.string)).items()}


def test_layout_and_model_info(tiny_model_dir: Path) -> None:
    version = tiny_model_dir / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert [p.name for p in tiny_model_dir.iterdir()] == ["1"]  # no staging directory left behind
    info = json.loads((version / "assets.extra" / MODEL_INFO_FILE).read_text())
    assert info["labels"] == list(LABELS)
    assert set(info["thresholds"]) == set(LABELS) and all(0.0 < t < 1.0 for t in info["thresholds"].values())
    assert info["tensorflow_version"] == tf.__version__
    assert info["profile"]["name"] == "tiny" and info["max_seq_len"] == 32
    assert info["metrics"]["split"] == "test" and 0.0 <= info["metrics"]["mean_roc_auc"] <= 1.0
    assert info["tf_serving_image"].startswith("tensorflow/serving:")


def test_the_export_holds_the_weights_and_no_optimizer_state(tiny_training) -> None:
    """The trained model is compiled, so it tracks its optimizer: AdamW's moments were saved beside the
    weights (2.5x the weights on disk and in every model server's memory: 297 MB for MiniLM, 117 of it
    the model)."""
    stored = tf.train.list_variables(str(tiny_training.version_dir / "variables" / "variables"))
    assert not [name for name, _ in stored if "optimizer" in name]
    stored_values = sum(int(np.prod(shape)) for name, shape in stored if not name.startswith("_CHECKPOINTABLE"))
    model_values = sum(int(np.prod(v.shape)) for v in tiny_training.output["train_result"].model.variables)
    # The classifier's variables, plus the preprocessor's few (none of them a weight matrix).
    assert model_values <= stored_values <= model_values * 1.01 + 1000, (stored_values, model_values)


def test_saved_model_cli_shows_the_contract(tiny_model_dir: Path) -> None:
    cli = Path(sys.executable).with_name("saved_model_cli")
    out = subprocess.run([str(cli), "show", "--dir", str(tiny_model_dir / "1"), "--all"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    start = text.index("signature_def['serving_default']")
    nxt = text.find("signature_def[", start + 10)
    block = text[start : nxt if nxt > 0 else len(text)]
    inputs = block[block.index("input(s):") : block.index("output(s):")]
    outputs = block[block.index("output(s):") : block.index("Method name")]
    pattern = re.compile(r"\['([^']+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\S+)")
    assert pattern.findall(inputs) == [("text", "DT_STRING", "(-1)")]
    names = []
    for name, dtype, shape in pattern.findall(outputs):
        names.append(name)
        assert shape == "(-1)", (name, shape)
        assert dtype == ("DT_BOOL" if name == "esp_truncated" else "DT_FLOAT"), (name, dtype)
    assert sorted(names) == sorted([*LABELS, *(f"esp_threshold_{l}" for l in LABELS), "esp_truncated"])


def test_export_predicts_what_the_trained_model_predicts(tiny_training, serving_fn) -> None:
    from training import records

    result = tiny_training.output["train_result"]
    test = records.read_split(str(tiny_training.data_dir), "test", len(LABELS))
    texts = test.texts[:64]
    trained = predict_probabilities(result.model, encode(result.preprocessor, texts, test.labels[:64]))
    out = _score(serving_fn, texts)
    exported = np.stack([out[l] for l in LABELS], axis=1)
    np.testing.assert_allclose(exported, trained, atol=1e-5)
    assert trained.std() > 0  # a real model, not a constant


def test_strings_of_every_shape(serving_fn) -> None:
    texts = [
        "",
        "idiot",
        "word " * 2000,  # 10,000 characters
        "x" * 10_000,  # one 10,000-character "word"
        "🙂🔥💩 👍🏽 👨‍👩‍👧",
        "日本語のコメントです。中文评论。",
        "Привет! مرحبا שלום",
        "   \n\t  ",
        "\u00a0non-breaking\u200bzero width\ufeff",
        "ｆｕｌｌ ｗｉｄｔｈ",
    ]
    out = _score(serving_fn, texts)
    for label in LABELS:
        assert out[label].shape == (len(texts),) and out[label].dtype == np.float32
        assert np.all((out[label] >= 0) & (out[label] <= 1))
    assert out["esp_truncated"].dtype == bool
    assert out["esp_truncated"].tolist() == [False, False, True, False, False, False, False, False, False, False]


def test_invalid_utf8_and_empty_batches_score(serving_fn) -> None:
    out = serving_fn(text=tf.constant([b"caf\xe9 \xff\xfe broken", b"ok"]))
    assert out["toxic"].shape == (2,)
    empty = serving_fn(text=tf.constant([], tf.string))
    assert all(v.shape[0] == 0 for v in empty.values())


def test_scores_do_not_depend_on_batch_neighbours(serving_fn) -> None:
    """Padding to the longest in the batch must be masked: a short text scores the same alone."""
    short = "thanks for the help"
    alone = _score(serving_fn, [short])
    padded = _score(serving_fn, [short, "a much longer comment " * 20])
    for label in LABELS:
        np.testing.assert_allclose(padded[label][0], alone[label][0], atol=1e-5)


def test_pads_to_the_longest_in_the_batch_not_to_the_maximum(tiny_training) -> None:
    pre = tiny_training.output["train_result"].preprocessor
    out = pre(tf.constant(["hello there", "hi"]))
    assert out["token_ids"].shape == (2, 4)  # [CLS] hello there [SEP]
    assert out["padding_mask"].numpy().tolist() == [[True] * 4, [True, True, True, False]]
    long = pre(tf.constant(["word " * 100]))
    assert long["token_ids"].shape == (1, pre.max_seq_len) and bool(long["truncated"][0])


def test_thresholds_are_outputs_on_every_row(tiny_training, serving_fn) -> None:
    info = json.loads((tiny_training.version_dir / "assets.extra" / MODEL_INFO_FILE).read_text())
    out = _score(serving_fn, ["a", "b", "c"])
    for label in LABELS:
        np.testing.assert_allclose(out[f"esp_threshold_{label}"], [info["thresholds"][label]] * 3, rtol=1e-6)


def test_warmup_requests_are_predict_requests(tiny_model_dir: Path) -> None:
    from tensorflow_serving.apis import prediction_log_pb2

    path = tiny_model_dir / "1" / "assets.extra" / WARMUP_FILE
    logs = []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw.numpy())
        logs.append(log)
    assert logs
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        texts = tf.make_ndarray(request.inputs["text"])
        assert texts.ndim == 1 and len(texts) >= 1


def test_graph_ops_are_on_the_serving_allowlist(tiny_model_dir: Path) -> None:
    ops = graph_ops(tiny_model_dir / "1")
    allowed = read_allowlist()
    assert "WordpieceTokenizeWithOffsets" in ops  # the tokenizer really is in the graph
    assert not ops - allowed, f"ops not verified for the pinned TF Serving image: {sorted(ops - allowed)}"
    # keras-hub's FastWordpiece ops are the ones stock TF Serving builds have lacked (DESIGN.md).
    assert not {o for o in ops if o.startswith("FastWordpiece") or o.startswith("FastBert")}


def test_allowlist_names_real_ops() -> None:
    """Each allowlisted op exists in this TensorFlow (core) or in tensorflow_text, as annotated."""
    import tensorflow_text  # noqa: F401  (registers the TF.Text ops)
    from tensorflow.python.framework import op_def_registry

    from training.export import OP_ALLOWLIST

    for line in OP_ALLOWLIST.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        op, source = line.split("#")[0].strip(), line.split("#")[1].strip()
        assert source in ("core", "tensorflow_text"), line
        assert op_def_registry.get(op) is not None, f"{op} is not a registered op"
        assert (source == "core") == hasattr(tf.raw_ops, op), line


def test_next_export_goes_beside_the_last(tiny_training, tmp_path: Path) -> None:
    from training.export import export_model

    result = tiny_training.output["train_result"]
    kwargs = dict(preprocessor=result.preprocessor, model=result.model, labels=result.labels,
                  thresholds={l: 0.5 for l in result.labels}, base_path=tmp_path)
    assert export_model(version=3, **kwargs).name == "3"
    assert export_model(**kwargs).name == "4"  # no version given: one above the highest
    with pytest.raises(FileExistsError):
        export_model(version=4, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
