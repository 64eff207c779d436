"""Export: the trained classifier as a TF Serving model version, exactly per docs/model-contract.md.

`<base>/<version>/` holds a SavedModel whose `serving_default` signature takes `text` (DT_STRING
[batch]) and runs the same Preprocessor training used, then returns one float32 [batch] output per
label, `esp_threshold_<label>` and `esp_truncated`. `assets.extra/` carries esp_model_info.json
and the warmup requests TF Serving replays before it marks the version available.
The version is written under a temporary name and renamed into place, so a server watching the
base path never loads a half-written version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_INFO_FILE = "esp_model_info.json"
WARMUP_FILE = "tf_serving_warmup_requests"
SIGNATURE_NAME = "serving_default"
INPUT_NAME = "text"
THRESHOLD_PREFIX = "esp_threshold_"
TRUNCATED_OUTPUT = "esp_truncated"

# The production model server image. TF Serving releases track TensorFlow releases one to one
# (tensorflow-serving-api 2.21.0 on PyPI is that release's API); see docs/training.md.
TF_SERVING_IMAGE = "tensorflow/serving:2.21.0"
OP_ALLOWLIST = Path(__file__).resolve().parent / "serving_ops" / "tf-serving-2.21.0.txt"

# Texts the warmup replays: batch sizes and lengths a server meets first, so every kernel and
# shape path is warm before traffic arrives.
_WARMUP_TEXTS = (
    "thanks for fixing the citation",
    "",
    "you are an idiot and everyone knows it",
    "This article needs more sources. " * 40,
)


def next_version(base_path: str | os.PathLike[str]) -> int:
    base = Path(base_path)
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()] if base.exists() else []
    return max(versions, default=0) + 1


class ServingModule:
    """Builds the tf.Module that is saved; a factory so TensorFlow is imported lazily."""

    @staticmethod
    def build(preprocessor, model, labels: Sequence[str], thresholds: Mapping[str, float]):
        import tensorflow as tf

        # The classifier's inputs are a dict keyed like the Preprocessor's outputs.
        input_keys = list(model.input.keys())

        class EspServing(tf.Module):
            def __init__(self):
                super().__init__(name="esp_serving")
                self.preprocessor = preprocessor
                # The classifier's variables, not the classifier: a compiled Keras model tracks its
                # optimizer, whose state (AdamW's two moments per weight) was saved beside the weights
                # and restored by every model server: 1.8x to 2.5x the model on disk and in memory.
                self.model_variables = list(model.variables)
                self.threshold_values = tf.constant([float(thresholds[l]) for l in labels], tf.float32)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
            def serve(self, text):
                features = self.preprocessor(text)
                logits = model({k: features[k] for k in input_keys}, training=False)
                probs = tf.sigmoid(tf.cast(logits, tf.float32))
                batch = tf.shape(text)[0]
                out = {}
                for j, label in enumerate(labels):
                    out[label] = tf.identity(probs[:, j], name=label)
                    out[THRESHOLD_PREFIX + label] = tf.fill([batch], self.threshold_values[j])
                out[TRUNCATED_OUTPUT] = features["truncated"]
                return out

        return EspServing()


def warmup_records(model_name: str, texts: Sequence[str] = _WARMUP_TEXTS) -> list[bytes]:
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    records = []
    for batch in ([texts[0]], list(texts), list(texts) * 8):
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE_NAME))
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto([t.encode("utf-8") for t in batch], dtype=tf.string))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def export_model(
    *,
    preprocessor,
    model,
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    base_path: str | os.PathLike[str],
    version: int | None = None,
    model_info: Mapping | None = None,
    model_name: str = "bert",
    overwrite: bool = False,
) -> Path:
    """Writes `<base_path>/<version>/` and returns it; `version=None` takes the next free one."""
    import tensorflow as tf

    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    version = next_version(base) if version is None else int(version)
    if version <= 0:
        raise ValueError("model versions are positive integers")
    final = base / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pick another version or pass overwrite")
    staging = base / f".tmp-{version}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)

    module = ServingModule.build(preprocessor, model, labels, thresholds)
    tf.saved_model.save(module, str(staging), signatures={SIGNATURE_NAME: module.serve})

    extra = staging / "assets.extra"
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for record in warmup_records(model_name):
            writer.write(record)
    info = build_model_info(preprocessor, labels, thresholds, model_info or {})
    (extra / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    logger.info("exported model version %d to %s", version, final)
    return final


def build_model_info(preprocessor, labels: Sequence[str], thresholds: Mapping[str, float], extra: Mapping) -> dict:
    import keras
    import keras_hub
    import tensorflow as tf
    import tensorflow_text as tf_text

    vocab_bytes = Path(preprocessor._vocab_asset.asset_path.numpy().decode()).read_bytes()
    return {
        "labels": list(labels),
        "thresholds": {l: float(thresholds[l]) for l in labels},
        "max_seq_len": int(preprocessor.max_seq_len),
        "wide_bigram_buckets": int(preprocessor.wide_bigram_buckets),
        "wide_max_tokens": int(preprocessor.wide_max_tokens),
        "wide_char_buckets": int(preprocessor.wide_char_buckets),
        "wide_max_chars": int(preprocessor.wide_max_chars),
        "vocab_size": int(preprocessor.vocab_size),
        "vocab_sha256": hashlib.sha256(vocab_bytes).hexdigest(),
        "tensorflow_version": tf.__version__,
        "tensorflow_text_version": tf_text.__version__,
        "keras_version": keras.__version__,
        "keras_hub_version": keras_hub.__version__,
        "tf_serving_image": TF_SERVING_IMAGE,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **dict(extra),
    }


def read_model_info(version_dir: str | os.PathLike[str]) -> dict:
    return json.loads((Path(version_dir) / "assets.extra" / MODEL_INFO_FILE).read_text())


def graph_ops(version_dir: str | os.PathLike[str]) -> set[str]:
    """Every op type in the SavedModel: the main graph and every function in its library."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(version_dir) / "saved_model.pb").read_bytes())
    ops: set[str] = set()
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    # Calls to functions of the library appear as ops named after the function: not real ops.
    functions = {fn.signature.name for mg in sm.meta_graphs for fn in mg.graph_def.library.function}
    return ops - functions


def read_allowlist(path: str | os.PathLike[str] = OP_ALLOWLIST) -> set[str]:
    ops = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ops.add(re.split(r"\s+", line)[0])
    return ops
