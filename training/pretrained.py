"""Loading a pretrained BERT the user has: a keras-hub preset directory or a Google-format TF checkpoint.

Either way the tokenizer stays `tensorflow_text.BertTokenizer`, over the vocabulary that came with
the weights, so a pretrained model and ESP's serving graph read text identically.

- keras-hub preset directory: `config.json` + `model.weights.h5` (what `backbone.save_to_preset`
  writes) and the vocabulary at `assets/tokenizer/vocabulary.txt` (or `vocab.txt`).
- TF checkpoint directory (Google's BERT release layout): `bert_config.json`, `vocab.txt` and a
  checkpoint (`bert_model.ckpt.*` or any prefix `tf.train.latest_checkpoint` finds) with variables
  named `bert/embeddings/...`, `bert/encoder/layer_N/...`, `bert/pooler/dense/...`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_VOCAB_CANDIDATES = ("assets/tokenizer/vocabulary.txt", "vocab.txt", "vocabulary.txt")


class PretrainedError(ValueError):
    """The path is not a usable pretrained BERT; the message says what is missing."""


def find_vocab(path: Path) -> Path:
    for rel in _VOCAB_CANDIDATES:
        if (path / rel).is_file():
            return path / rel
    raise PretrainedError(f"{path}: no vocabulary found (looked for {', '.join(_VOCAB_CANDIDATES)})")


def load_pretrained(path: str | os.PathLike[str], cache_dir: str | None = None):
    """Returns (keras_hub BertBackbone with the pretrained weights, vocabulary path)."""
    root = Path(path)
    if not root.is_dir():
        raise PretrainedError(f"{root} is not a directory")
    vocab = find_vocab(root)
    if (root / "config.json").is_file():
        backbone = _load_preset(root)
    elif (root / "bert_config.json").is_file():
        backbone = _load_tf_checkpoint(root)
    else:
        raise PretrainedError(f"{root}: neither a keras-hub preset (config.json) nor a TF BERT checkpoint (bert_config.json)")
    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    if vocab_size != backbone.vocabulary_size:
        raise PretrainedError(f"{root}: vocabulary has {vocab_size} entries but the model expects {backbone.vocabulary_size}")
    logger.info("loaded pretrained BERT from %s: %d layers, %d wide", root, backbone.num_layers, backbone.hidden_dim)
    return backbone, vocab


def _load_preset(root: Path):
    import keras_hub

    try:
        return keras_hub.models.BertBackbone.from_preset(str(root))
    except Exception as exc:  # keras-hub raises several types for a malformed preset
        raise PretrainedError(f"{root}: cannot load the keras-hub preset: {exc}") from exc


def _load_tf_checkpoint(root: Path):
    import tensorflow as tf

    from training.model import build_backbone
    from training.profiles import Profile

    config = json.loads((root / "bert_config.json").read_text())
    prefix = tf.train.latest_checkpoint(str(root))
    if prefix is None:
        candidates = sorted(root.glob("*.ckpt.index")) or sorted(root.glob("*.index"))
        if not candidates:
            raise PretrainedError(f"{root}: no TF checkpoint (*.index) found")
        prefix = str(candidates[0])[: -len(".index")]
    reader = tf.train.load_checkpoint(prefix)
    profile = Profile(
        name="pretrained",
        description="from a TF checkpoint",
        num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        hidden_dim=int(config["hidden_size"]),
        intermediate_dim=int(config["intermediate_size"]),
        max_seq_len=int(config.get("max_position_embeddings", 512)),
        dropout=float(config.get("hidden_dropout_prob", 0.1)),
    )
    backbone = build_backbone(profile, int(config["vocab_size"]))
    assign_google_checkpoint(backbone, reader.get_tensor)
    return backbone


def google_checkpoint_names(num_layers: int) -> dict[str, str]:
    """keras-hub BertBackbone weight path -> Google BERT checkpoint variable name."""
    names = {
        "token_embedding/embeddings": "bert/embeddings/word_embeddings",
        "position_embedding/embeddings": "bert/embeddings/position_embeddings",
        "segment_embedding/embeddings": "bert/embeddings/token_type_embeddings",
        "embeddings_layer_norm/gamma": "bert/embeddings/LayerNorm/gamma",
        "embeddings_layer_norm/beta": "bert/embeddings/LayerNorm/beta",
        "pooled_dense/kernel": "bert/pooler/dense/kernel",
        "pooled_dense/bias": "bert/pooler/dense/bias",
    }
    per_layer = {
        "self_attention_layer/query": "attention/self/query",
        "self_attention_layer/key": "attention/self/key",
        "self_attention_layer/value": "attention/self/value",
        "self_attention_layer/attention_output": "attention/output/dense",
        "feedforward_intermediate_dense": "intermediate/dense",
        "feedforward_output_dense": "output/dense",
    }
    norms = {"self_attention_layer_norm": "attention/output/LayerNorm", "feedforward_layer_norm": "output/LayerNorm"}
    for i in range(num_layers):
        for ours, theirs in per_layer.items():
            for part in ("kernel", "bias"):
                names[f"transformer_layer_{i}/{ours}/{part}"] = f"bert/encoder/layer_{i}/{theirs}/{part}"
        for ours, theirs in norms.items():
            for part in ("gamma", "beta"):
                names[f"transformer_layer_{i}/{ours}/{part}"] = f"bert/encoder/layer_{i}/{theirs}/{part}"
    return names


def assign_google_checkpoint(backbone, get) -> None:
    """Copies Google-BERT-named tensors into a keras-hub BertBackbone.

    Google's attention kernels are [hidden, hidden]; keras-hub keeps them per head
    ([hidden, heads, head_dim] and [heads, head_dim, hidden]): same numbers, reshaped.
    """
    weights = {w.path: w for w in backbone.weights}
    for ours, theirs in google_checkpoint_names(backbone.num_layers).items():
        weight = weights[ours]
        value = np.asarray(get(theirs))
        if ours.startswith("position_embedding/"):
            value = value[: weight.shape[0]]
        if value.size != int(np.prod(weight.shape)):
            raise PretrainedError(f"checkpoint tensor {theirs} has shape {value.shape}, the model needs {tuple(weight.shape)}")
        weight.assign(value.reshape(tuple(weight.shape)))
