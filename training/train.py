"""Training: prepared records in, a trained classifier, its dev thresholds and its history out.

Tokenisation runs once, up front, through the same in-graph Preprocessor the export uses; batches
are then drawn with length bucketing (rows of similar length together, padded to the longest), so
CPU time goes into real word pieces rather than padding. Each epoch (or each part of one, with
`evals_per_epoch`) ends with the dev mean ROC AUC, which drives checkpointing and early stopping;
`seed` fixes initialisation, order and dropout. With teachers (training.distill) the encoder also
learns their soft targets; with `cross_fit` it trains on all training folds but one, to become
one of those teachers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoded:
    """A split after tokenisation: per-row arrays, ready for batching."""

    token_ids: list[np.ndarray]
    wide_ids: list[np.ndarray] | None
    truncated: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class TrainResult:
    model: object  # keras.Model producing logits
    preprocessor: object  # training.preprocess.Preprocessor
    profile: object  # training.profiles.Profile
    labels: tuple[str, ...]
    history: list[dict]
    best_epoch: int
    train_seconds: float
    dev_probabilities: np.ndarray
    dev_labels: np.ndarray
    pretrained: str | None
    vocab_path: str
    seed: int
    wide_only_dev_auc: float | None = None  # the logistic-regression wide part alone, before the encoder trains
    timings: dict = dataclasses.field(default_factory=dict)  # seconds per stage: tokenise, wide_fit, soft_targets, encoder
    train_rows: int = 0
    cross_fit: tuple[int, int] | None = None
    distillation: dict | None = None  # teachers, alpha, rows each teacher scored


def configure_tensorflow(seed: int, threads: int = 0) -> None:
    import keras
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            logger.debug("TensorFlow threads already configured in this process")
    keras.utils.set_random_seed(seed)


def encode(preprocessor, texts: Sequence[str], labels: np.ndarray, batch_size: int = 512, progress: Callable | None = None) -> Encoded:
    """Tokenises a split with the in-graph Preprocessor, then unpads rows for length bucketing."""
    import tensorflow as tf

    fn = tf.function(preprocessor.__call__, input_signature=[tf.TensorSpec([None], tf.string)])
    token_ids: list[np.ndarray] = []
    wide_ids: list[np.ndarray] | None = [] if preprocessor.wide_bigram_buckets else None
    truncated: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        out = fn(tf.constant(list(texts[start : start + batch_size]), tf.string))
        mask = out["padding_mask"].numpy()
        ids = out["token_ids"].numpy()
        token_ids.extend(row[: int(m.sum())] for row, m in zip(ids, mask))
        if wide_ids is not None:
            w = out["wide_ids"].numpy()
            wide_ids.extend(row[row != 0] for row in w)
        truncated.append(out["truncated"].numpy())
        if progress:
            progress(min(batch_size, len(texts) - start))
    trunc = np.concatenate(truncated) if truncated else np.zeros((0,), bool)
    return Encoded(token_ids, wide_ids, trunc, labels)


def _pad(rows: Sequence[np.ndarray]) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def make_batch(data: Encoded, idx: Sequence[int]) -> dict[str, np.ndarray]:
    """Pads a batch exactly as the export does: [PAD] (0) up to the longest row of the batch."""
    tokens = _pad([data.token_ids[i] for i in idx])
    batch = {"token_ids": tokens, "padding_mask": tokens != 0}
    # [PAD] is id 0 in BERT vocabularies; padding_mask must come from lengths if it were not.
    if data.wide_ids is not None:
        batch["wide_ids"] = _pad([data.wide_ids[i] for i in idx])
    return batch


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows: sort within random chunks, then shuffle batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def predict_probabilities(model, data: Encoded, batch_size: int = 256) -> np.ndarray:
    import tensorflow as tf

    infer = tf.function(lambda x: tf.sigmoid(model(x, training=False)), reduce_retracing=True)
    lengths = np.array([len(t) for t in data.token_ids])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(data), data.labels.shape[1]), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = infer({k: tf.constant(v) for k, v in make_batch(data, idx).items()}).numpy()
    return out


def wide_features(data: Encoded, idf: np.ndarray):
    """The sparse matrix of what WideNgrams computes per row: idf / norm for each distinct id."""
    from scipy.sparse import csr_matrix

    indptr, indices, values = [0], [], []
    for row in data.wide_ids:
        ids = np.unique(row)
        w = idf[ids]
        norm = math.sqrt(max(float((w * w).sum()), 1e-6))
        indices.append(ids)
        values.append(w / norm)
        indptr.append(indptr[-1] + len(ids))
    flat_values = np.concatenate(values) if values else np.zeros(0)
    flat_indices = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    return csr_matrix((flat_values, flat_indices, indptr), shape=(len(data), len(idf)))


def fit_wide_logreg(layer, data: Encoded, c: float, progress: bool = False, targets: np.ndarray | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Fits the wide part as L2-regularised logistic regression on the exact features the graph
    computes (binary TF-IDF over the row's distinct n-gram ids), then freezes it.

    IDF is sklearn's smooth form, log((1 + n) / (1 + df)) + 1, from the training split; n-grams
    never seen in training get IDF 0, so, as in a fitted TfidfVectorizer, they count for nothing.
    `targets` (probabilities in [0, 1], e.g. labels blended with a teacher's soft targets) replace
    the labels: each row then counts as a positive with weight t and a negative with weight 1 - t,
    which is logistic regression's cross-entropy against t.

    With `cache_dir`, a fit is kept under a hash of everything it depends on (the rows' n-gram ids,
    the targets, C, the table size): models that share a wide part (minilm and default, a student
    and its reference) fit it once. Returns (idf, coef, bias, facts), facts saying how long the
    fit took when it ran and whether it came from the cache.
    """
    from sklearn.linear_model import LogisticRegression
    from tqdm import tqdm

    n, num_ids = len(data), layer.num_ids
    fit_targets = data.labels if targets is None else targets
    cached = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"wide-logreg:{num_ids}:{c!r}:{targets is not None}".encode())
        digest.update(np.ascontiguousarray(fit_targets, np.float32).tobytes())
        for row in data.wide_ids:
            digest.update(np.int64(len(row)).tobytes() + np.ascontiguousarray(row, np.int32).tobytes())
        cached = Path(cache_dir) / "wide-fits" / f"{digest.hexdigest()[:32]}.npz"
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            idf, coef, bias, seconds = z["idf"], z["coef"], z["bias"], float(z["seconds"])
            cpu = float(z["cpu_seconds"]) if "cpu_seconds" in z else math.nan
        logger.info("wide part from the cache (%s; it took %.0fs to fit)", cached, seconds)
        facts = {"seconds_to_fit": seconds, "cpu_seconds_to_fit": cpu, "cached": True}
    else:
        t0, cpu0 = time.monotonic(), time.process_time()
        df = np.zeros(num_ids, np.int64)
        for row in data.wide_ids:
            df[np.unique(row)] += 1
        idf = np.where(df > 0, np.log((1.0 + n) / (1.0 + df)) + 1.0, 0.0)
        x = wide_features(data, idf)
        coef = np.zeros((num_ids, data.labels.shape[1]), np.float32)
        bias = np.zeros(data.labels.shape[1], np.float32)
        if targets is not None:
            from scipy.sparse import vstack

            x_twice = vstack([x, x]).tocsr()
            sides = np.r_[np.ones(n), np.zeros(n)]
        for j in tqdm(range(data.labels.shape[1]), desc="fitting wide part", disable=not progress, leave=False):
            y = data.labels[:, j]
            if 0 < y.sum() < len(y):
                clf = LogisticRegression(C=c, solver="liblinear", max_iter=1000)
                if targets is None:
                    clf.fit(x, y)
                else:
                    t = np.clip(targets[:, j].astype(np.float64), 0.0, 1.0)
                    clf.fit(x_twice, sides, sample_weight=np.r_[t, 1.0 - t])
                coef[:, j] = clf.coef_[0]
                bias[j] = clf.intercept_[0]
        facts = {"seconds_to_fit": round(time.monotonic() - t0, 1), "cpu_seconds_to_fit": round(time.process_time() - cpu0, 1), "cached": False}
        logger.info("wide part fitted by logistic regression on %d rows x %d n-gram ids (%d seen)", n, num_ids, int((df > 0).sum()))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.npz")
            np.savez(tmp, idf=idf, coef=coef, bias=bias, seconds=facts["seconds_to_fit"], cpu_seconds=facts["cpu_seconds_to_fit"])
            os.replace(tmp, cached)
    layer.idf.assign(idf.astype(np.float32))
    layer.table.assign(coef)
    layer.bias.assign(bias)
    layer.trainable = False
    return idf, coef, bias, facts


def out_of_fold_logits(x, labels: np.ndarray, folds: int, c: float) -> np.ndarray:
    """Wide-part logits for each training row from a logistic regression fitted without its fold."""
    from sklearn.linear_model import LogisticRegression

    fold = np.arange(x.shape[0]) % folds  # rows are sorted by id, itself a hash: folds are random
    out = np.zeros(labels.shape, np.float32)
    for k in range(folds):
        train_rows, held = fold != k, fold == k
        for j in range(labels.shape[1]):
            y = labels[train_rows, j]
            if 0 < y.sum() < len(y):
                clf = LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x[train_rows], y)
                out[held, j] = clf.decision_function(x[held])
    return out


def positive_weights(labels: np.ndarray, power: float, cap: float) -> np.ndarray:
    pos = labels.sum(axis=0)
    neg = len(labels) - pos
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return np.minimum(ratio**power, cap).astype(np.float32)


def _weighted_bce(pos_weight: np.ndarray, distill_alpha: float | None = None):
    """The class-weighted cross-entropy on the labels; with `distill_alpha`, y_true is
    [labels | soft targets] and the loss is (1 - alpha) x that + alpha x cross-entropy against
    the soft targets (unweighted: the teacher's probabilities already carry its class weighting)."""
    from keras import ops

    pw = ops.convert_to_tensor(pos_weight)
    num_labels = len(pos_weight)

    def loss(y_true, logits):
        y_true = ops.cast(y_true, logits.dtype)
        hard = y_true[:, :num_labels]
        # -[w*y*log(sigmoid(z)) + (1-y)*log(1-sigmoid(z))], in the stable softplus form.
        per = pw * hard * ops.softplus(-logits) + (1.0 - hard) * ops.softplus(logits)
        if distill_alpha is None:
            return ops.mean(per, axis=-1)
        soft = y_true[:, num_labels:]
        per_soft = soft * ops.softplus(-logits) + (1.0 - soft) * ops.softplus(logits)
        return ops.mean((1.0 - distill_alpha) * per + distill_alpha * per_soft, axis=-1)

    return loss


def _schedule(peak: float, total_steps: int, warmup_fraction: float):
    import keras

    warmup = max(1, int(total_steps * warmup_fraction))

    class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            from keras import ops

            step = ops.cast(step, "float32")
            up = peak * (step + 1.0) / warmup
            down = peak * ops.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup))
            return ops.where(step < warmup, up, down)

        def get_config(self):
            return {"peak": peak, "total_steps": total_steps, "warmup_fraction": warmup_fraction}

    return WarmupLinearDecay()


def progress_log(total_steps: int, done_steps: int, batch_size: int, every_s: float = 30.0):
    """A Keras callback that logs a line every `every_s` seconds of a long fit (step, loss,
    sequences/s, time left): for logs and pipes, where Keras's one-line bar cannot be shown."""
    import keras

    class ProgressLog(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = self.last = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if now - self.last < every_s:
                return
            self.last = now
            step = done_steps + batch + 1
            rate = (batch + 1) / max(now - self.t0, 1e-9)
            left = (total_steps - step) / rate
            logger.info("step %d/%d: loss %.4f, %.0f seq/s, about %.0f min left in training",
                        step, total_steps, float((logs or {}).get("loss", math.nan)), rate * batch_size, left / 60)

    return ProgressLog()


def _epoch_label(epoch: float) -> str:
    return f"{int(epoch):03d}" if float(epoch).is_integer() else f"{epoch:07.3f}"


def resolve_pretrained(profile, pretrained: str | None, pretrained_cache_dir: str | None) -> str | None:
    """The weights to fine-tune: `pretrained` if given, else the profile's own (fetched) ones."""
    if pretrained or not profile.pretrained:
        return pretrained
    from training.pretrained import PretrainedError
    from training.weights import WeightsError, resolve

    try:
        return str(resolve(profile.pretrained, pretrained_cache_dir))
    except WeightsError as exc:
        raise PretrainedError(f"the {profile.name} profile fine-tunes {profile.pretrained}: {exc}") from None


def train(
    data_dir: str,
    profile,
    work_dir: str,
    *,
    seed: int = 42,
    pretrained: str | None = None,
    pretrained_cache_dir: str | None = None,
    cache_dir: str | None = None,
    threads: int = 0,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    teachers: Sequence[str] = (),
    allow_in_sample_teacher: bool = False,
    cross_fit: tuple[int, int] | None = None,
) -> TrainResult:
    """Trains `profile` on the prepared data in `data_dir`; checkpoints under `work_dir`.

    `teachers`: exported models whose probabilities are soft targets (training.distill).
    `cross_fit=(k, K)`: train on every training fold but k, so this model can be teacher k.
    """
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from training import records
    from training.metrics import mean_auc, roc_aucs
    from training.model import build_backbone, build_classifier, float32_copy, training_dtype, with_dtype
    from training.preprocess import Preprocessor, read_vocab, shipped_vocab_path

    configure_tensorflow(seed, threads)
    timings: dict[str, float] = {}
    # Missing weights or teachers fail before minutes of reading and tokenising.
    pretrained = resolve_pretrained(profile, pretrained, pretrained_cache_dir)
    if teachers:
        from training.distill import load_teacher

        for teacher in teachers:
            load_teacher(teacher)
    labels = records.labels_of(records.read_stats(data_dir), data_dir)
    train_split = records.read_split(data_dir, "train", len(labels))
    if cross_fit is not None:
        from training.distill import fold_mask

        keep = ~fold_mask(train_split.ids, *cross_fit)
        train_split = records.Split([i for i, k in zip(train_split.ids, keep) if k], [t for t, k in zip(train_split.texts, keep) if k], train_split.labels[keep])
        logger.info("cross-fit: training on %d rows, fold %d of %d held out", len(train_split), *cross_fit)
    records.check_learnable(labels, train_split.labels)  # the data's training rows, before any profile's cap
    train_split = train_split.head(profile.max_train_rows)
    dev_split = records.read_split(data_dir, "dev", len(labels)).head(profile.max_dev_rows)
    if len(train_split) == 0 or len(dev_split) == 0:
        raise records.DataError(f"{data_dir}: the train and dev splits must both have rows")

    soft = None
    distillation = None
    if teachers:
        from training.distill import soft_targets

        t0 = time.monotonic()
        soft, distillation = soft_targets(teachers, train_split.ids, train_split.texts, labels, cache_dir=cache_dir,
                                          allow_in_sample=allow_in_sample_teacher, progress=progress)
        timings["soft_targets"] = round(time.monotonic() - t0, 1)
        # What the wide part learned from: a jointly trained one sees the blended loss like the encoder.
        if profile.wide_fit != "logreg":
            wide_part = "trained with the encoder, on the same blend"
        else:
            wide_part = "labels and soft targets" if profile.distill_wide else "labels"
        distillation = {**distillation, "alpha": profile.distill_alpha, "wide_part": wide_part}
        logger.info("soft targets for %d training rows in %.0fs (alpha %.2f)", len(soft), timings["soft_targets"], profile.distill_alpha)

    backbone = None
    if pretrained:
        from training.pretrained import load_pretrained

        backbone, vocab_path = load_pretrained(pretrained, cache_dir=cache_dir)
        max_len = min(profile.max_seq_len, backbone.max_sequence_length)
        profile = dataclasses.replace(profile, max_seq_len=max_len, hidden_dim=backbone.hidden_dim, num_layers=backbone.num_layers,
                                      num_heads=backbone.num_heads, intermediate_dim=backbone.intermediate_dim)
    else:
        vocab_path = shipped_vocab_path(cache_dir)
    preprocessor = Preprocessor(
        vocab_path, profile.max_seq_len, profile.wide_bigram_buckets, profile.wide_max_tokens,
        wide_char_buckets=profile.wide_char_buckets, wide_max_chars=profile.wide_max_chars,
    )
    if backbone is None:
        backbone = build_backbone(profile, len(read_vocab(vocab_path)))
    dtype = training_dtype(profile.train_dtype)
    if dtype != profile.train_dtype:
        logger.info("training in %s, not %s: this CPU has no native bfloat16 (no AMX or AVX512-BF16)", dtype, profile.train_dtype)
    model = build_classifier(profile, with_dtype(backbone, dtype), len(labels), preprocessor.wide_vocab_size)

    t0 = time.monotonic()
    total_rows = len(train_split) + len(dev_split)
    with tqdm(total=total_rows, desc="tokenising", unit="rows", disable=not progress, leave=False) as bar:
        train_data = encode(preprocessor, train_split.texts, train_split.labels, progress=bar.update)
        dev_data = encode(preprocessor, dev_split.texts, dev_split.labels, progress=bar.update)
    timings["tokenise"] = round(time.monotonic() - t0, 1)
    logger.info("train %d rows (%.1f%% truncated at %d pieces), dev %d rows", len(train_data), 100 * train_data.truncated.mean(), profile.max_seq_len, len(dev_data))

    train_offsets = None
    wide_only_dev_auc = None
    if preprocessor.wide_vocab_size and profile.wide_fit == "logreg":
        t0 = time.monotonic()
        wide_targets = None
        if soft is not None and profile.distill_wide:
            wide_targets = (1.0 - profile.distill_alpha) * train_data.labels + profile.distill_alpha * soft
        from training.preprocess import DEFAULT_CACHE_DIR

        idf, coef, bias, facts = fit_wide_logreg(model.get_layer("wide"), train_data, profile.wide_logreg_c, progress, targets=wide_targets,
                                                 cache_dir=Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
        wide_dev = 1 / (1 + np.exp(-(wide_features(dev_data, idf) @ coef + bias)))
        wide_only_dev_auc = mean_auc(roc_aucs(labels, dev_data.labels, wide_dev))
        timings["wide_fit"] = round(time.monotonic() - t0, 1)
        # A cached fit costs seconds here but took this long once: what a fresh run pays.
        timings["wide_fit_uncached"] = facts["seconds_to_fit"] if facts["cached"] else timings["wide_fit"]
        timings["wide_fit_cpu_uncached"] = facts["cpu_seconds_to_fit"]
        timings["wide_fit_cached"] = facts["cached"]
        logger.info("wide part ready in %.0fs: alone, dev mean ROC AUC %.4f", timings["wide_fit"], wide_only_dev_auc)

        if profile.wide_oof_folds > 1:
            t0 = time.monotonic()
            train_offsets = out_of_fold_logits(wide_features(train_data, idf), train_data.labels, profile.wide_oof_folds, profile.wide_logreg_c)
            logger.info("%d-fold out-of-fold wide logits in %.0fs", profile.wide_oof_folds, time.monotonic() - t0)

    lengths = np.array([len(t) for t in train_data.token_ids])
    steps_per_epoch = math.ceil(len(train_data) / profile.batch_size)
    total_steps = steps_per_epoch * profile.epochs
    pos_weight = positive_weights(train_data.labels, profile.pos_weight_power, profile.pos_weight_cap)
    logger.info("positive-class loss weights: %s", dict(zip(labels, np.round(pos_weight, 2).tolist())))
    optimizer = keras.optimizers.AdamW(
        learning_rate=_schedule(profile.learning_rate, total_steps, profile.warmup_fraction),
        weight_decay=profile.weight_decay,
        clipnorm=1.0,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "ngram_weights", "ngram_bias"])
    fit_model = model
    if train_offsets is not None:
        # The encoder trains against the out-of-fold wide logits (an input); dev, checkpoints and
        # the export use `model`, whose wide part is the full fit. The layers are shared.
        offset_in = keras.Input(shape=(len(labels),), dtype="float32", name="wide_offset")
        fit_inputs = {"token_ids": model.input["token_ids"], "padding_mask": model.input["padding_mask"], "wide_offset": offset_in}
        fit_model = keras.Model(fit_inputs, keras.layers.Add()([model.get_layer("deep_logits").output, offset_in]))
    fit_model.compile(optimizer=optimizer, loss=_weighted_bce(pos_weight, profile.distill_alpha if soft is not None else None))
    targets = train_data.labels if soft is None else np.concatenate([train_data.labels, soft], axis=1).astype(np.float32)

    ckpt_dir = Path(work_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    def fit_batch(idx):
        batch = make_batch(train_data, idx)
        if train_offsets is not None:
            batch.pop("wide_ids", None)
            batch["wide_offset"] = train_offsets[idx]
        return batch

    specs = {"padding_mask": tf.TensorSpec([None, None], tf.bool), "wide_offset": tf.TensorSpec([None, len(labels)], tf.float32)}
    signature = (
        {k: specs.get(k, tf.TensorSpec([None, None], tf.int32)) for k in fit_batch([0])},
        tf.TensorSpec([None, targets.shape[1]], tf.float32),
    )

    history: list[dict] = []
    best = (-math.inf, 0.0)
    bad_evals = 0
    done_steps = 0
    evals = max(1, profile.evals_per_epoch)
    # Keras's bar rewrites one line: on a terminal. Piped into a log it is thousands of lines; there a
    # log line every 30 s (progress_log) and the per-evaluation summary (on_epoch) say what matters.
    keras_bar = 1 if progress and sys.stdout.isatty() else 0
    started = time.monotonic()
    stop = False
    for epoch in range(1, profile.epochs + 1):
        rng = np.random.default_rng([seed, epoch])
        batches = bucketed_batches(lengths, profile.batch_size, rng)
        bounds = np.linspace(0, len(batches), evals + 1).round().astype(int)
        for part in range(evals):
            chunk = batches[bounds[part] : bounds[part + 1]]
            if not chunk:
                continue

            def gen(chunk=chunk) -> Iterator:
                for idx in chunk:
                    yield fit_batch(idx), targets[idx]

            dataset = tf.data.Dataset.from_generator(gen, output_signature=signature).prefetch(2)
            t0 = time.monotonic()
            cbs = [] if keras_bar else [progress_log(total_steps, done_steps, profile.batch_size)]
            fit = fit_model.fit(dataset, epochs=1, steps_per_epoch=len(chunk), shuffle=False, verbose=keras_bar, callbacks=cbs)
            done_steps += len(chunk)
            dev_probs = predict_probabilities(model, dev_data)
            aucs = roc_aucs(labels, dev_data.labels, dev_probs)
            at = epoch - 1 + (part + 1) / evals
            at = int(at) if float(at).is_integer() else round(at, 3)
            record = {
                "epoch": at,
                "step": done_steps,
                "loss": float(fit.history["loss"][-1]),
                "dev_mean_roc_auc": mean_auc(aucs),
                "dev_roc_auc": aucs,
                "seconds": round(time.monotonic() - t0, 1),
            }
            history.append(record)
            logger.info("epoch %s/%d: loss %.4f, dev mean ROC AUC %.4f (%.0fs)", at, profile.epochs, record["loss"], record["dev_mean_roc_auc"], record["seconds"])
            if on_epoch:
                on_epoch(record)
            model.save_weights(ckpt_dir / f"epoch-{_epoch_label(at)}.weights.h5")
            if record["dev_mean_roc_auc"] > best[0]:
                best = (record["dev_mean_roc_auc"], at)
                bad_evals = 0
                model.save_weights(ckpt_dir / "best.weights.h5")
            else:
                bad_evals += 1
                if bad_evals >= profile.early_stopping_patience:
                    logger.info("early stopping: dev mean ROC AUC has not improved for %d evaluations", bad_evals)
                    stop = True
                    break
        if stop:
            break
    train_seconds = time.monotonic() - started
    timings["encoder"] = round(train_seconds, 1)
    if best[1] != history[-1]["epoch"]:
        model.load_weights(ckpt_dir / "best.weights.h5")
    model = float32_copy(profile, model)
    dev_probs = predict_probabilities(model, dev_data)
    (Path(work_dir) / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(
        model=model,
        preprocessor=preprocessor,
        profile=profile,
        labels=labels,
        history=history,
        best_epoch=best[1],
        train_seconds=train_seconds,
        dev_probabilities=dev_probs,
        dev_labels=dev_data.labels,
        pretrained=pretrained,
        vocab_path=str(vocab_path),
        seed=seed,
        wide_only_dev_auc=wide_only_dev_auc,
        timings=timings,
        train_rows=len(train_data),
        cross_fit=cross_fit,
        distillation=distillation,
    )
