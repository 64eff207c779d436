"""The one tokeniser: raw strings in, the model's input tensors out, inside the TensorFlow graph.

Training and the exported SavedModel call the same `Preprocessor` (tensorflow_text.BertTokenizer
over the shipped uncased vocabulary), so train/serve skew cannot creep in. Sequences are padded to
the longest in the batch, not to the maximum length, so short comments cost less. The same
word pieces feed the wide part: hashed uni- and bigram ids over a longer window than the encoder
reads, which is what lets a small from-scratch BERT match TF-IDF (docs/training.md).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf
import tensorflow_text as tf_text

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_VOCAB_GZ = REPO_ROOT / "data" / "bert-vocab" / "bert-base-uncased-vocab.txt.gz"
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "esp"

# A multiplier for the bigram hash; any odd constant far above the vocabulary size spreads pairs.
_BIGRAM_MULTIPLIER = 1_000_003


def shipped_vocab_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The shipped vocabulary, gunzipped once into the cache (atomically: agents share the cache)."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    target = cache / "vocab" / "bert-base-uncased-vocab.txt"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(SHIPPED_VOCAB_GZ, "rb") as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, target)
    return target


def read_vocab(path: str | os.PathLike[str]) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class Preprocessor(tf.Module):
    """Tokenises a [batch] string tensor into encoder inputs and wide-part n-gram ids.

    Returns a dict: `token_ids` int32 [batch, L] ([CLS] pieces [SEP], padded with [PAD] to the
    longest row, L <= max_seq_len), `padding_mask` bool [batch, L], `wide_ids` int32 [batch, W]
    (0 = padding), and `truncated` bool [batch] (more pieces than the encoder reads).
    """

    def __init__(
        self,
        vocab_path: str | os.PathLike[str],
        max_seq_len: int,
        wide_bigram_buckets: int = 0,
        wide_max_tokens: int = 256,
        wide_char_buckets: int = 0,
        wide_max_chars: int = 2000,
        wide_char_ngrams: tuple[int, int] = (2, 5),
    ) -> None:
        super().__init__(name="esp_preprocessor")
        if max_seq_len < 3:
            raise ValueError("max_seq_len must be at least 3 ([CLS], one piece, [SEP])")
        vocab = read_vocab(vocab_path)
        index = {tok: i for i, tok in enumerate(vocab)}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in index:
                raise ValueError(f"vocabulary {vocab_path} has no {special} token")
        self.vocab_size = len(vocab)
        self.pad_id = index["[PAD]"]
        self.unk_id = index["[UNK]"]
        self.cls_id = index["[CLS]"]
        self.sep_id = index["[SEP]"]
        self.mask_id = index.get("[MASK]", self.unk_id)
        self.max_seq_len = max_seq_len
        self.wide_bigram_buckets = wide_bigram_buckets
        self.wide_max_tokens = wide_max_tokens
        self.wide_char_buckets = wide_char_buckets if wide_bigram_buckets else 0
        self.wide_max_chars = wide_max_chars
        self.wide_char_ngrams = tuple(wide_char_ngrams)
        # The vocabulary file becomes a SavedModel asset through the initializer.
        self._vocab_asset = tf.saved_model.Asset(str(vocab_path))
        init = tf.lookup.TextFileInitializer(
            self._vocab_asset,
            key_dtype=tf.string,
            key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
            value_dtype=tf.int64,
            value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
        )
        self.table = tf.lookup.StaticVocabularyTable(init, num_oov_buckets=1)
        self.tokenizer = tf_text.BertTokenizer(self.table, token_out_type=tf.int64, lower_case=True, unknown_token="[UNK]")  # nosec B106: the vocabulary's unknown-piece token, not a password

    @property
    def wide_vocab_size(self) -> int:
        """Rows of the wide part's weight table: padding, one per piece, then the bigram buckets."""
        if not self.wide_bigram_buckets:
            return 0
        return 1 + self.vocab_size + self.wide_bigram_buckets + self.wide_char_buckets

    def pieces(self, text: tf.Tensor) -> tf.RaggedTensor:
        """Word-piece ids, ragged [batch, (pieces)], no special tokens."""
        ids = self.tokenizer.tokenize(text).merge_dims(-2, -1)
        # The OOV bucket (id == vocab size) cannot occur with unknown_token set; map it to [UNK]
        # anyway so no id can ever index past the embedding table.
        return tf.ragged.map_flat_values(lambda v: tf.where(v >= self.vocab_size, tf.cast(self.unk_id, v.dtype), v), ids)

    def __call__(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        text = tf.convert_to_tensor(text, dtype=tf.string)
        # Invalid UTF-8 becomes U+FFFD instead of failing the whole batch in the tokenizer; valid
        # text passes through unchanged, so training (always valid) sees no difference.
        text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
        pieces = self.pieces(text)
        batch = tf.shape(text, out_type=tf.int64)[0]
        lengths = pieces.row_lengths()
        body = pieces[:, : self.max_seq_len - 2]
        truncated = lengths > self.max_seq_len - 2
        cls = tf.fill([batch, 1], tf.constant(self.cls_id, tf.int64))
        sep = tf.fill([batch, 1], tf.constant(self.sep_id, tf.int64))
        seq = tf.concat([cls, body, sep], axis=1)
        token_ids = tf.cast(seq.to_tensor(default_value=self.pad_id), tf.int32)
        # An empty batch pads to width 0; keep two columns so the encoder's [CLS] slice is valid.
        token_ids = tf.pad(token_ids, [[0, 0], [0, tf.maximum(0, 2 - tf.shape(token_ids)[1])]], constant_values=self.pad_id)
        padding_mask = tf.sequence_mask(seq.row_lengths(), maxlen=tf.shape(token_ids, out_type=tf.int64)[1])
        out = {"token_ids": token_ids, "padding_mask": padding_mask, "truncated": truncated}
        if self.wide_bigram_buckets:
            wide = self._wide_ids(pieces[:, : self.wide_max_tokens])
            if self.wide_char_buckets:
                wide = tf.concat([wide, self._char_ngram_ids(text)], axis=1)
            out["wide_ids"] = tf.cast(wide.to_tensor(default_value=0), tf.int32)
        return out

    def _wide_ids(self, pieces: tf.RaggedTensor) -> tf.Tensor:
        unigrams = pieces + 1
        # Bigrams: consecutive pieces within a row, hashed into buckets after the unigram range.
        left = pieces[:, :-1]
        right = pieces[:, 1:]
        mixed = left * _BIGRAM_MULTIPLIER + right
        bigrams = tf.math.floormod(mixed, self.wide_bigram_buckets) + 1 + self.vocab_size
        return tf.concat([unigrams, bigrams], axis=1)

    def _char_ngram_ids(self, text: tf.Tensor) -> tf.RaggedTensor:
        """Hashed character n-grams within words (each padded with a space), of the case-folded
        first `wide_max_chars` characters: the features TF-IDF's char_wb analyzer uses, in-graph."""
        low = tf_text.case_fold_utf8(tf.strings.substr(text, 0, self.wide_max_chars, unit="UTF8_CHAR"))
        words = tf.strings.split(low)
        padded = tf.ragged.map_flat_values(lambda w: tf.strings.join([" ", w, " "]), words)
        chars = tf.strings.unicode_split(padded, "UTF-8", errors="replace")
        lo, hi = self.wide_char_ngrams
        grams = tf.concat([tf.strings.ngrams(chars, n, separator="") for n in range(lo, hi + 1)], axis=2)
        flat = grams.merge_dims(1, 2)
        offset = 1 + self.vocab_size + self.wide_bigram_buckets
        return tf.ragged.map_flat_values(lambda g: tf.strings.to_hash_bucket_fast(g, self.wide_char_buckets) + offset, flat)
