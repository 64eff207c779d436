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


class DataError(ValueError):
    """Prepared data that no model can be trained on; the CLI prints it as one line."""


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


def labels_of(stats: dict, data_dir: str) -> tuple[str, ...]:
    """The labels stats.json names, checked by the rule prepare-data applies: they become the
    model's output keys and every consumer's names, so a stats.json written by hand or by an older
    ESP must not smuggle in a name prepare-data would refuse."""
    from esp.settings.training import label_problem

    labels = stats.get("labels") if isinstance(stats, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise DataError(f"{data_dir}/{STATS_FILE}: 'labels' must be a non-empty list of names")
    problem = label_problem(tuple(labels))
    if problem:
        raise DataError(f"{data_dir}/{STATS_FILE}: {problem}")
    return tuple(labels)


def check_learnable(labels: Sequence[str], y: np.ndarray) -> None:
    """Refuses a label with one class only in the training rows: with no positives its threshold
    is a placeholder and its score meaningless; with no negatives its positives weigh nothing in
    the loss (the weight is sqrt(negatives / positives)). Either way the model would ship a label
    it never learned, and consumers would read its scores as if it had."""
    rows = len(y)
    for label, positives in zip(labels, y.sum(axis=0)):
        if positives == 0 or positives == rows:
            which = "no" if positives == 0 else "only"
            raise DataError(f"label {label!r} has {which} positive rows among the {rows} training rows: nothing to learn")


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
