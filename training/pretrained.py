"""Loading a pretrained BERT the user has: a Hugging Face directory, a keras-hub preset, or a
Google-format TF checkpoint.

Whatever the format, the tokenizer stays `tensorflow_text.BertTokenizer`, over the vocabulary that
came with the weights, so a pretrained model and ESP's serving graph read text identically.

- Hugging Face directory (`config.json` with `model_type: bert`, `model.safetensors`,
  `tokenizer.json` and/or `vocab.txt`), e.g. all-MiniLM-L6-v2 as `esp pretrained fetch` unpacks it.
  keras-hub converts the weights (`BertBackbone.from_preset`, needs `safetensors`). The tokenizer
  description is checked against what the in-graph tokenizer does (`check_hf_tokenizer`): a
  WordPiece vocabulary with `##` continuations and `[UNK]`, lower-casing, accent stripping and
  Chinese-character splitting. A model whose tokenizer differs is refused: fine-tuning it through
  a tokenizer that reads text differently would quietly throw its pretraining away.
- keras-hub preset directory: `config.json` + `model.weights.h5` (what `backbone.save_to_preset`
  writes) and the vocabulary at `assets/tokenizer/vocabulary.txt` (or `vocab.txt`).
- TF checkpoint directory (Google's BERT release layout): `bert_config.json`, `vocab.txt` and a
  checkpoint (`bert_model.ckpt.*` or any prefix `tf.train.latest_checkpoint` finds) with variables
  named `bert/embeddings/...`, `bert/encoder/layer_N/...`, `bert/pooler/dense/...`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import tempfile
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


def read_json_object(path: Path) -> dict:
    """A JSON file of the user's directory that must hold an object: anything else is a PretrainedError
    naming the file (a list or a string holding "model_type" would otherwise pass `in` and crash on `.get`)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PretrainedError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path}: not a JSON object")
    return value


def is_hf_directory(root: Path) -> bool:
    """A Hugging Face model directory: its config.json names a `model_type` (keras-hub's names a class)."""
    config = root / "config.json"
    return config.is_file() and "model_type" in read_json_object(config)


def load_pretrained(path: str | os.PathLike[str], cache_dir: str | None = None):
    """Returns (keras_hub BertBackbone with the pretrained weights, vocabulary path)."""
    root = Path(path)
    if not root.is_dir():
        raise PretrainedError(f"{root} is not a directory")
    if is_hf_directory(root):
        vocab = hf_vocab_file(root, cache_dir)
        backbone = _load_hf(root)
    elif (root / "config.json").is_file():
        vocab = find_vocab(root)
        backbone = _load_preset(root)
    elif (root / "bert_config.json").is_file():
        vocab = find_vocab(root)
        backbone = _load_tf_checkpoint(root)
    else:
        raise PretrainedError(
            f"{root}: not a Hugging Face BERT (config.json with model_type), a keras-hub preset (config.json) "
            "or a TF BERT checkpoint (bert_config.json)"
        )
    _check_finite(root, backbone)
    vocab_size = len(read_vocab_file(vocab))
    if vocab_size != backbone.vocabulary_size:
        raise PretrainedError(f"{root}: vocabulary has {vocab_size} entries but the model expects {backbone.vocabulary_size}")
    logger.info("loaded pretrained BERT from %s: %d layers, %d wide", root, backbone.num_layers, backbone.hidden_dim)
    return backbone, vocab


def _check_finite(root: Path, backbone) -> None:
    """No loader checks the numbers themselves: a NaN or an infinity in a weight would be fine-tuned
    into a model that scores NaN, after the whole training run."""
    for weight in backbone.weights:
        if not np.isfinite(np.asarray(weight.numpy())).all():
            raise PretrainedError(f"{root}: the weight {weight.path} holds values that are not finite (NaN or infinity)")


def _load_preset(root: Path):
    import keras_hub

    _check_preset_against_weights(root)
    try:
        return keras_hub.models.BertBackbone.from_preset(str(root))
    except Exception as exc:  # keras-hub raises several types for a malformed preset
        raise PretrainedError(f"{root}: cannot load the keras-hub preset: {exc}") from exc


# keras-hub preset: model.weights.h5 datasets whose shapes are config sizes.
_PRESET_SIZED = {
    "layers/reversible_embedding/vars/0": ("vocabulary_size", "hidden_dim"),
    "layers/position_embedding/vars/0": ("max_sequence_length", "hidden_dim"),
    "layers/transformer_encoder/_feedforward_intermediate_dense/vars/0": ("hidden_dim", "intermediate_dim"),
}
_PRESET_HEADS = "layers/transformer_encoder/_self_attention_layer/key_dense/vars/0"  # [hidden, heads, head size]


def _check_preset_against_weights(root: Path) -> None:
    """As for a Hugging Face directory: keras-hub builds what config.json says, then reads just that from
    model.weights.h5. Fewer layers than the file holds were silently dropped, and a million layers hung
    in the build; so the config must describe the file, before anything is built."""
    config = read_json_object(root / "config.json")
    sizes = config.get("config")
    if config.get("class_name") != "BertBackbone" or not isinstance(sizes, dict):
        raise PretrainedError(f"{root}/config.json: not a keras-hub BertBackbone preset (class_name {config.get('class_name')!r})")
    weights = root / "model.weights.h5"
    shapes = _h5_dataset_shapes(weights)
    for name, (kind, _) in shapes.items():
        if kind != "f":
            raise PretrainedError(f"{weights}: {name} is not stored as floating point")
    layers = {int(m.group(1) or 0) for name in shapes if (m := re.match(r"layers/transformer_encoder(?:_(\d+))?/", name))}
    declared = sizes.get("num_layers")
    if type(declared) is not int or layers != set(range(declared)):
        raise PretrainedError(f"{root}: the weights hold encoder layers {sorted(layers)} but config.json says num_layers {declared!r}")
    for name, keys in _PRESET_SIZED.items():
        expected = [sizes.get(key) for key in keys]
        # Exactly ints: 16.0 or true compare equal to a shape's 16 or 1, and keras-hub would build from them.
        if any(type(v) is not int for v in expected) or shapes.get(name, (None, None))[1] != expected:
            raise PretrainedError(
                f"{weights}: {name} is {shapes.get(name, (None, 'missing'))[1]} but config.json says "
                + " x ".join(f"{k} {v!r}" for k, v in zip(keys, expected))
            )
    heads = shapes.get(_PRESET_HEADS, (None, None))[1]
    if not heads or len(heads) != 3 or type(sizes.get("num_heads")) is not int or heads[1] != sizes.get("num_heads"):
        raise PretrainedError(f"{weights}: {_PRESET_HEADS} is {heads} but config.json says num_heads {sizes.get('num_heads')!r}")


def _h5_dataset_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Dataset name -> (numpy dtype kind, shape), from the HDF5 file's metadata alone."""
    import h5py

    if not path.is_file():
        raise PretrainedError(f"{path}: no such file (a keras-hub preset keeps its weights there)")
    out: dict[str, tuple[str, list[int]]] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = (obj.dtype.kind, [int(n) for n in obj.shape])

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PretrainedError(f"{path}: not a readable HDF5 weights file ({exc})") from None
    return out


# What tensorflow_text.BertTokenizer(lower_case=True) does, in the words of a Hugging Face
# tokenizer.json: BertNormalizer(lowercase, accents stripped, Chinese characters split), BERT's
# whitespace-and-punctuation pre-tokenizer, WordPiece with "##" continuations and [UNK].
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def check_hf_tokenizer(tokenizer: dict, where: str = "tokenizer.json") -> list[str]:
    """The vocabulary (id order) of a Hugging Face tokenizer.json, if the in-graph tokenizer reads
    text the same way; otherwise PretrainedError saying which setting differs."""
    def refuse(what: str) -> PretrainedError:
        return PretrainedError(f"{where}: {what}; ESP's in-graph tokenizer (tensorflow_text.BertTokenizer, lower-cased) "
                               "would read text differently from the way this model was pretrained")

    if not isinstance(tokenizer, dict):
        raise refuse("not a JSON object")
    normalizer = tokenizer.get("normalizer")
    if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise refuse(f"normalizer is {kind!r}, not BertNormalizer")
    if normalizer.get("lowercase") is not True:
        raise refuse("the model is cased (normalizer.lowercase is not true)")
    # None means "as lowercase says": lower-cased BERT strips accents; false keeps them.
    if normalizer.get("strip_accents") not in (None, True):
        raise refuse("normalizer.strip_accents is false (accents kept)")
    if normalizer.get("handle_chinese_chars") is not True:
        raise refuse("normalizer.handle_chinese_chars is not true (Chinese characters not split)")
    pre = tokenizer.get("pre_tokenizer")
    if not isinstance(pre, dict) or pre.get("type") != "BertPreTokenizer":
        raise refuse(f"pre_tokenizer is {pre.get('type') if isinstance(pre, dict) else pre!r}, not BertPreTokenizer")
    model = tokenizer.get("model")
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        raise refuse(f"model is {model.get('type') if isinstance(model, dict) else model!r}, not WordPiece")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise refuse(f"word pieces continue with {model.get('continuing_subword_prefix')!r}, not '##'")
    if model.get("unk_token") != "[UNK]":
        raise refuse(f"the unknown token is {model.get('unk_token')!r}, not '[UNK]'")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise refuse("model.vocab is missing or empty")
    return _vocab_in_id_order(vocab, where)


def _vocab_in_id_order(vocab: dict, where: str) -> list[str]:
    tokens: list[str | None] = [None] * len(vocab)
    for token, index in vocab.items():
        if not isinstance(index, int) or not 0 <= index < len(vocab) or tokens[index] is not None:
            raise PretrainedError(f"{where}: vocabulary ids are not 0..{len(vocab) - 1}, each once (token {token!r} has id {index!r})")
        if not token or "\n" in token:
            raise PretrainedError(f"{where}: vocabulary holds an empty or multi-line token at id {index}")
        tokens[index] = token
    missing = [t for t in _SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise PretrainedError(f"{where}: vocabulary lacks {', '.join(missing)}")
    return [t for t in tokens if t is not None]


def read_vocab_file(path: Path) -> list[str]:
    """A one-token-a-line vocabulary, checked as tokenizer.json's is. Counting its lines was not
    enough: not UTF-8 was a UnicodeDecodeError, a missing [CLS] a ValueError from the Preprocessor
    and a repeated token an error from TF's lookup table, all tracebacks after the load."""
    from training.preprocess import read_vocab

    try:
        listed = read_vocab(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise PretrainedError(f"{path}: not a readable UTF-8 vocabulary ({exc})") from None
    repeated = next((t for t, n in collections.Counter(listed).items() if n > 1), None)
    if repeated is not None:
        raise PretrainedError(f"{path}: the token {repeated!r} is listed more than once")
    return _vocab_in_id_order({t: i for i, t in enumerate(listed)}, str(path))


def hf_vocab_file(root: Path, cache_dir: str | None = None) -> Path:
    """The checked vocabulary of a Hugging Face directory, as the one-token-a-line file the in-graph
    tokenizer reads: the shipped vocabulary file itself when they are token for token equal (so the
    export records the same vocabulary hash as every other ESP model), else a copy in the cache."""
    from training.preprocess import DEFAULT_CACHE_DIR, read_vocab, shipped_vocab_path

    tokens = None
    if (root / "tokenizer.json").is_file():
        tokenizer = read_json_object(root / "tokenizer.json")
        tokens = check_hf_tokenizer(tokenizer, str(root / "tokenizer.json"))
    if (root / "vocab.txt").is_file():
        listed = read_vocab_file(root / "vocab.txt")
        if tokens is None:
            _check_tokenizer_config(root)
            tokens = listed
        elif listed != tokens:
            raise PretrainedError(f"{root}: vocab.txt and tokenizer.json disagree on the vocabulary")
    if tokens is None:
        raise PretrainedError(f"{root}: no tokenizer.json or vocab.txt: the vocabulary is unknown")
    config = read_json_object(root / "config.json")
    if config.get("vocab_size") != len(tokens):
        raise PretrainedError(f"{root}: the vocabulary has {len(tokens)} tokens but config.json says vocab_size {config.get('vocab_size')}")
    shipped = shipped_vocab_path(cache_dir)
    if read_vocab(shipped) == tokens:
        return shipped
    text = "".join(t + "\n" for t in tokens).encode("utf-8")
    target = (Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR) / "vocab" / f"vocab-{hashlib.sha256(text).hexdigest()[:16]}.txt"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, target)
    return target


def _check_tokenizer_config(root: Path) -> None:
    """Without tokenizer.json, tokenizer_config.json (when present) must describe an uncased BERT tokenizer."""
    path = root / "tokenizer_config.json"
    if not path.is_file():
        return
    config = read_json_object(path)
    if config.get("do_lower_case") is False:
        raise PretrainedError(f"{path}: the model is cased (do_lower_case false); ESP's in-graph tokenizer lower-cases")
    if config.get("strip_accents") is False:
        raise PretrainedError(f"{path}: strip_accents is false; ESP's in-graph tokenizer strips accents")
    if config.get("tokenize_chinese_chars") is False:
        raise PretrainedError(f"{path}: tokenize_chinese_chars is false; ESP's in-graph tokenizer splits Chinese characters")


def _load_hf(root: Path):
    import keras_hub

    config = read_json_object(root / "config.json")
    if config.get("model_type") != "bert":
        raise PretrainedError(f"{root}: model_type is {config.get('model_type')!r}; ESP fine-tunes BERT-architecture encoders")
    if not ((root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file()):
        raise PretrainedError(f"{root}: no model.safetensors")
    try:
        import safetensors  # noqa: F401  (keras-hub reads Hugging Face weights through it)
    except ImportError:
        raise PretrainedError("loading Hugging Face weights needs the safetensors package: pip install -e '.[training]'") from None
    _check_config_against_weights(root, config)
    try:
        return keras_hub.models.BertBackbone.from_preset(str(root))
    except Exception as exc:  # keras-hub raises several types for a malformed checkpoint
        raise PretrainedError(f"{root}: cannot load the Hugging Face weights: {exc}") from exc


# config.json sizes that allocate, and a tensor whose shape is those sizes (PyTorch's [out, in]).
_SIZED_TENSORS = {
    "embeddings.word_embeddings.weight": ("vocab_size", "hidden_size"),
    "embeddings.position_embeddings.weight": ("max_position_embeddings", "hidden_size"),
    "encoder.layer.0.intermediate.dense.weight": ("intermediate_size", "hidden_size"),
}


def _check_config_against_weights(root: Path, config: dict) -> None:
    """keras-hub builds what config.json says, then reads just that from the weights: more layers in
    the file were silently dropped (0 layers: the embeddings alone), and a huge size was allocated
    (or hung) before any shape was compared. So config.json must describe the file, before building."""
    headers = _hf_tensor_headers(root)
    shapes = {name: header[1] for name, header in headers.items()}
    # keras assigns an integer tensor into a float weight without a word (a quantised export's raw
    # int8, its scales elsewhere); buffers such as embeddings.position_ids are int64 and not read.
    for name, header in headers.items():
        if name.endswith((".weight", ".bias", ".gamma", ".beta")) and header[0] not in _FLOAT_DTYPES:
            raise PretrainedError(f"{root}: {name} is stored as {header[0]}, not floating point")
    layers = {int(m.group(1)) for name in shapes if (m := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", name))}
    declared = config.get("num_hidden_layers")
    if not isinstance(declared, int) or layers != set(range(declared)):
        raise PretrainedError(f"{root}: the weights hold encoder layers {sorted(layers)} but config.json says num_hidden_layers {declared!r}")
    for suffix, keys in _SIZED_TENSORS.items():
        shape = next((shape for name, shape in shapes.items() if name == suffix or name.endswith("." + suffix)), None)
        expected = [config.get(key) for key in keys]
        if shape is not None and shape != expected:
            raise PretrainedError(f"{root}: {suffix} is {shape} but config.json says {' x '.join(f'{k} {v!r}' for k, v in zip(keys, expected))}")


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _hf_tensor_headers(root: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape), from the safetensors headers alone.

    keras-hub reads the shards model.safetensors.index.json names whenever that file exists, even
    beside a model.safetensors, so the index decides here too, and every shard's header is read."""
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return _safetensors_headers(root / "model.safetensors")
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PretrainedError(f"{index}: no weight_map of tensor names to shard files")
    for shard in weight_map.values():
        # keras-hub joins the name to the directory: `../x` would read a file outside it.
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise PretrainedError(f"{index}: shard {shard!r} is not a file name in {root}")
    headers: dict[str, tuple[str, list[int]]] = {}
    for shard in sorted(set(weight_map.values())):
        stored = _safetensors_headers(root / shard)
        for name in (n for n, s in weight_map.items() if s == shard):
            if name not in stored:
                raise PretrainedError(f"{index}: {name} is not in {shard}")
            headers[name] = stored[name]
    return headers


def _safetensors_headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise PretrainedError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="np") as f:
            return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise PretrainedError(f"{path}: not a readable safetensors file ({exc})") from None


def _load_tf_checkpoint(root: Path):
    import tensorflow as tf

    from training.model import build_backbone
    from training.profiles import Profile

    config = read_json_object(root / "bert_config.json")
    prefix = tf.train.latest_checkpoint(str(root))
    if prefix is None:
        candidates = sorted(root.glob("*.ckpt.index")) or sorted(root.glob("*.index"))
        if not candidates:
            raise PretrainedError(f"{root}: no TF checkpoint (*.index) found")
        prefix = str(candidates[0])[: -len(".index")]
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as exc:
        raise PretrainedError(f"{prefix}: not a readable TF checkpoint ({exc})") from None
    shapes = reader.get_variable_to_shape_map()
    where = root / "bert_config.json"
    try:
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
        vocab_size = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:  # a key missing, or a value that is no number
        raise PretrainedError(f"{where}: missing or malformed setting ({type(exc).__name__}: {exc})") from None
    # As for Hugging Face weights: the model is built from the config, so the config must describe
    # the checkpoint before anything is built (a million layers hung; fewer than stored were dropped).
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"bert/encoder/layer_(\d+)/", name))}
    if layers != set(range(profile.num_layers)):
        raise PretrainedError(f"{where}: num_hidden_layers is {profile.num_layers} but the checkpoint holds encoder layers {sorted(layers)}")
    if profile.num_heads < 1 or profile.hidden_dim % profile.num_heads:  # 0 heads was a ZeroDivisionError
        raise PretrainedError(f"{where}: hidden_size {profile.hidden_dim} is not a multiple of num_attention_heads {profile.num_heads}")
    # The sizes that allocate, against the stored tensors (a huge one ran out of memory in the build).
    sized = {"bert/embeddings/word_embeddings": [vocab_size, profile.hidden_dim],
             "bert/encoder/layer_0/intermediate/dense/kernel": [profile.hidden_dim, profile.intermediate_dim]}
    for name, expected in sized.items():
        if name in shapes and shapes[name] != expected:
            raise PretrainedError(f"{where}: the sizes say {name} is {expected} but the checkpoint's is {shapes[name]}")
    positions = shapes.get("bert/embeddings/position_embeddings", [profile.max_seq_len])[0]  # none: get() says so
    if positions < profile.max_seq_len:  # fewer are fine (the first ones are used), more are not there
        raise PretrainedError(f"{where}: max_position_embeddings {profile.max_seq_len} but the checkpoint stores {positions} positions")

    def get(name: str) -> np.ndarray:
        if name not in shapes:
            raise PretrainedError(f"{prefix}: the checkpoint has no variable {name}")
        value = np.asarray(reader.get_tensor(name))
        # assign would cast raw (say, quantised) integers silently; bfloat16 is ml_dtypes', not numpy's kind "f"
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            raise PretrainedError(f"{prefix}: {name} is stored as {value.dtype}, not floating point")
        return value

    backbone = build_backbone(profile, vocab_size)
    assign_google_checkpoint(backbone, get)
    return backbone


def google_checkpoint_names(num_layers: int) -> dict[str, str]:
    """keras-hub BertBackbone weight path -> Google BERT checkpoint variable name."""
    names = {
        "token_embedding/embeddings": "bert/embeddings/word_embeddings",  # nosec B105: a variable name, not a password
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
        # The shape itself, not only the size: a kernel stored [out, in] has the numbers of [in, out]
        # and would be reshaped into the layer, scrambled without a word.
        if value.shape != _google_shape(ours, tuple(weight.shape)):
            raise PretrainedError(f"checkpoint tensor {theirs} has shape {value.shape}, the model needs {_google_shape(ours, tuple(weight.shape))}")
        weight.assign(value.reshape(tuple(weight.shape)))


def _google_shape(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Google's shape for one of our weights: attention kept whole where keras-hub splits it per head."""
    if "/self_attention_layer/attention_output/kernel" in ours:  # [heads, head_dim, hidden]
        return (shape[0] * shape[1], shape[2])
    if "/self_attention_layer/" in ours and len(shape) == 3:  # query/key/value kernel [hidden, heads, head_dim]
        return (shape[0], shape[1] * shape[2])
    if "/self_attention_layer/" in ours and len(shape) == 2:  # query/key/value bias [heads, head_dim]
        return (shape[0] * shape[1],)
    return shape
