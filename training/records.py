"""The prepared-data format shared by `esp prepare-data` (writer) and `esp train` (reader).

One directory per prepared data set:
  `<split>-NNNNN-of-NNNNN.tfrecord`  tf.train.Example records: `id` (bytes), `text` (bytes, already
                                      normalised), `labels` (float list, in the order of stats.json)
  `stats.json`                       labels, rows per split, prevalence, rejects by reason
  `rejects-*.jsonl`                  rows that were refused, each with its reason
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "dev", "test")
STATS_FILE = "stats.json"


def encode_example(comment_id: str, text: str, labels: Sequence[float]) -> bytes:
    import tensorflow as tf

    feature = {
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[comment_id.encode("utf-8")])),
        "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")])),
        "labels": tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in labels])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@dataclasses.dataclass
class Split:
    """One split held in memory, rows sorted by id so that a seed alone fixes the training order."""

    ids: list[str]
    texts: list[str]
    labels: np.ndarray  # float32 [rows, labels]

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> Split:
        if n <= 0 or n >= len(self):
            return self
        return Split(self.ids[:n], self.texts[:n], self.labels[:n])


def split_pattern(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}-*.tfrecord")


def read_stats(data_dir: str) -> dict:
    import tensorflow as tf

    path = os.path.join(data_dir, STATS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: run `esp prepare-data` first")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def read_split(data_dir: str, split: str, num_labels: int) -> Split:
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(split_pattern(data_dir, split)))
    if not files:
        raise FileNotFoundError(f"no {split} records under {data_dir}: run `esp prepare-data` first")
    spec = {
        "id": tf.io.FixedLenFeature([], tf.string),
        "text": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.FixedLenFeature([num_labels], tf.float32),
    }
    ids: list[str] = []
    texts: list[str] = []
    labels: list[np.ndarray] = []
    for batch in tf.data.TFRecordDataset(files).batch(4096).map(lambda x: tf.io.parse_example(x, spec)):
        ids.extend(v.decode("utf-8") for v in batch["id"].numpy())
        texts.extend(v.decode("utf-8") for v in batch["text"].numpy())
        labels.append(batch["labels"].numpy())
    order = sorted(range(len(ids)), key=ids.__getitem__)
    all_labels = np.concatenate(labels).astype(np.float32) if labels else np.zeros((0, num_labels), np.float32)
    return Split([ids[i] for i in order], [texts[i] for i in order], all_labels[order])
