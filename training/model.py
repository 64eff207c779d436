"""The classifier: keras-hub's BertBackbone, a pooled multi-label head, and an optional wide part.

The Keras model maps the Preprocessor's tensors to one logit per label; the export adds the
sigmoid. The wide part is a linear model over hashed word-piece uni- and bigrams in the same
graph (a "wide and deep" model): it reads more of a long comment than the encoder does and learns
the lexical signal that TF-IDF is good at, while the encoder learns context.
"""

from __future__ import annotations

import keras
import keras_hub
from keras import ops

from training.profiles import Profile


class MaskedMeanPool(keras.layers.Layer):
    """Mean of the sequence output over real (non-padding) positions."""

    def call(self, sequence, mask):
        weights = ops.expand_dims(ops.cast(mask, sequence.dtype), -1)
        total = ops.sum(sequence * weights, axis=1)
        count = ops.maximum(ops.sum(weights, axis=1), 1.0)
        return total / count


class WideNgrams(keras.layers.Layer):
    """A linear model over the set of n-gram ids of a row: binary TF-IDF, computed in the graph.

    logits = sum over the row's distinct ids of table[id] * idf[id] / norm + bias, with
    norm = sqrt(sum of idf[id]^2 over the distinct ids): exactly scikit-learn's
    TfidfVectorizer(binary=True) row (L2-normalised) times a weight vector. Id 0 is padding.
    Distinct ids are found by sorting each row and keeping the first of each run. `idf` is a
    constant table set from the training split (ones until then); `table` and `bias` are either
    learned with the rest of the model or fitted by logistic regression first (training.train,
    `wide_fit="logreg"`). Binary beat counts and sublinear counts here: docs/training.md.
    """

    def __init__(self, num_ids: int, num_outputs: int, **kwargs):
        super().__init__(**kwargs)
        self.num_ids = num_ids
        self.num_outputs = num_outputs

    def build(self, input_shape):
        self.table = self.add_weight(shape=(self.num_ids, self.num_outputs), initializer="zeros", name="ngram_weights")
        self.bias = self.add_weight(shape=(self.num_outputs,), initializer="zeros", name="ngram_bias")
        self.idf = self.add_weight(shape=(self.num_ids,), initializer="ones", name="ngram_idf", trainable=False)

    def call(self, ids):
        ids = ops.sort(ids, axis=1)
        previous = ops.concatenate([ops.zeros_like(ids[:, :1]) - 1, ids[:, :-1]], axis=1)
        first = ops.logical_and(ops.not_equal(ids, previous), ops.not_equal(ids, 0))
        idf = ops.take(self.idf, ids, axis=0) * ops.cast(first, self.compute_dtype)
        rows = ops.take(self.table, ids, axis=0) * ops.expand_dims(idf, -1)
        norm = ops.sqrt(ops.maximum(ops.sum(idf * idf, axis=1, keepdims=True), 1e-6))
        return ops.sum(rows, axis=1) / norm + self.bias

    def get_config(self):
        return {**super().get_config(), "num_ids": self.num_ids, "num_outputs": self.num_outputs}


def build_backbone(profile: Profile, vocab_size: int) -> keras_hub.models.BertBackbone:
    return keras_hub.models.BertBackbone(
        vocabulary_size=vocab_size,
        num_layers=profile.num_layers,
        num_heads=profile.num_heads,
        hidden_dim=profile.hidden_dim,
        intermediate_dim=profile.intermediate_dim,
        dropout=profile.dropout,
        max_sequence_length=profile.max_seq_len,
    )


# CPU flags under which oneDNN runs bfloat16 matmuls natively; elsewhere they are emulated.
_NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def training_dtype(wanted: str, cpuinfo: str | None = None, *, gpu: bool | None = None) -> str:
    """The dtype to train in: `wanted`, except "mixed_bfloat16" on a CPU that would emulate it.

    On CPUs with AMX or AVX512-BF16 a MiniLM step runs about 3x faster in mixed bfloat16; on an
    AVX2-only CPU it ran 0.9x as fast as float32 (bench/bench_train_dtype.py, docs/training.md),
    so there the profile trains in float32. The export is float32 either way.
    """
    if wanted != "mixed_bfloat16":
        return wanted
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        return wanted
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return wanted  # not Linux: trust the profile
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return wanted if flags & _NATIVE_BF16_FLAGS else "float32"


def with_dtype(backbone: keras_hub.models.BertBackbone, dtype: str) -> keras_hub.models.BertBackbone:
    """The same encoder (same weights) computing in `dtype`, e.g. "mixed_bfloat16" for training."""
    if backbone.dtype_policy.name == dtype:
        return backbone
    clone = type(backbone).from_config({**backbone.get_config(), "dtype": dtype})
    clone.set_weights(backbone.get_weights())
    return clone


def float32_copy(profile: Profile, model: keras.Model) -> keras.Model:
    """A float32 classifier with `model`'s weights: what is exported after mixed-precision training
    (bfloat16 matmuls are fast on CPUs with AMX and slow on others; float32 serves anywhere)."""
    backbone = next(layer for layer in model.layers if isinstance(layer, keras_hub.models.BertBackbone))
    if backbone.dtype_policy.name == "float32":
        return model
    wide_ids = model.get_layer("wide").num_ids if "wide_ids" in model.input else 0
    copy = build_classifier(profile, with_dtype(backbone, "float32"), model.output.shape[-1], wide_ids)
    copy.set_weights(model.get_weights())
    return copy


def build_classifier(
    profile: Profile,
    backbone: keras_hub.models.BertBackbone,
    num_labels: int,
    wide_vocab_size: int = 0,
) -> keras.Model:
    """The trainable model: {token_ids, padding_mask[, wide_ids]} -> logits [batch, labels]."""
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="bool", name="padding_mask")
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    encoded = backbone(
        {"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids), "padding_mask": padding_mask}
    )
    pooled = []
    if profile.pooling == "mean":
        # The [CLS] pooler is unused: frozen, so the optimiser does not look for its gradients.
        backbone.get_layer("pooled_dense").trainable = False
    if profile.pooling in ("cls", "cls_mean"):
        pooled.append(encoded["pooled_output"])
    if profile.pooling in ("mean", "cls_mean"):
        pooled.append(MaskedMeanPool(name="mean_pool")(encoded["sequence_output"], padding_mask))
    features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="pooled")(pooled)
    features = keras.layers.Dropout(profile.dropout, name="head_dropout")(features)
    logits = keras.layers.Dense(num_labels, name="deep_logits")(features)
    if wide_vocab_size:
        wide_ids = keras.Input(shape=(None,), dtype="int32", name="wide_ids")
        inputs["wide_ids"] = wide_ids
        logits = keras.layers.Add(name="logits")([logits, WideNgrams(wide_vocab_size, num_labels, name="wide")(wide_ids)])
    return keras.Model(inputs, logits, name="esp_bert_classifier")
