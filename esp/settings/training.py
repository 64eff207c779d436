"""Settings of the model pipeline: data preparation, training/export, and the evaluation report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from esp.settings.base import require, setting

PROFILE_CHOICES = ("tiny", "demo", "default", "minilm", "base")
INPUT_FORMATS = ("auto", "csv", "jsonl")
JIGSAW_LABEL_COLUMNS = "toxic,severe_toxic,obscene,threat,insult,identity_hate"

# A label becomes a SavedModel output key, a TF op name, a score-record key and an HTTP attribute
# name: letters, digits and underscores, starting with a letter. `esp_` is the contract's own prefix.
_LABEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


# Names a label cannot take, in any case: the score record's own fields and the columns the
# backfill's BigQuery scores table has beside one column per label (beam_jobs.bigquery's
# SCORES_FIXED_COLUMNS). In that row a label `id` would overwrite the comment id, and the flags
# would overwrite a label `flags`.
RESERVED_LABELS = frozenset(
    {"schema_version", "id", "scores", "flags", "truncated", "model", "published_at", "scored_at"}
    | {"model_name", "model_version", "run_id"}
)


def label_problem(labels: tuple[str, ...]) -> str | None:
    """Why these label names cannot be a model's outputs, or None when they can."""
    for label in labels:
        if not _LABEL_NAME.fullmatch(label):
            return f"label {label!r} must be 1-64 letters, digits or underscores, starting with a letter"
        if label.lower().startswith("esp_"):
            return f"label {label!r} may not start with esp_ (the model contract's own outputs do)"
        if label.lower() in RESERVED_LABELS:
            return f"label {label!r} is the name of a score record field or scores table column ({', '.join(sorted(RESERVED_LABELS))})"
    # Case-insensitively: `toxic` and `TOXIC` are one Perspective attribute (TOXIC) and one
    # BigQuery column (column names ignore case), so one label's score would stand for both.
    seen: dict[str, str] = {}
    for label in labels:
        twin = seen.get(label.lower())
        if twin is not None:
            how = "is given twice" if twin == label else f"and {twin!r} differ only in case"
            return f"label {label!r} {how}: labels must be distinct, ignoring case"
        seen[label.lower()] = label
    return None


def columns_problem(id_column: str, text_column: str, labels: tuple[str, ...]) -> str | None:
    """Why the id, text and label columns cannot be read together, or None when they can. A column
    read both as the text and as a label would teach the model its own answer; as the id and as a
    label, it would split the data by that label (the split is a hash of the id)."""
    if not text_column:
        return "text_column must name a column"
    for what, column in (("text_column", text_column), ("id_column", id_column)):
        if column in labels:
            return f"{what} {column!r} is also one of the label_columns"
    return None


def parse_cross_fit_fold(value: str | None) -> tuple[int, int] | None:
    """"k/K" -> (k, K), 1 <= k <= K, K >= 2; None stays None."""
    if value is None or not value.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not match:
        raise ValueError(f"cross_fit_fold must look like 1/2 (fold k of K), got {value!r}")
    k, folds = int(match.group(1)), int(match.group(2))
    if folds < 2 or not 1 <= k <= folds:
        raise ValueError(f"cross_fit_fold {value!r}: need K >= 2 and 1 <= k <= K")
    return k, folds


@dataclass(frozen=True)
class DataSettings:
    """Where prepared training data lives: written by `esp prepare-data`, read by train/evaluate."""

    data_dir: str = setting(
        "artifacts/data", env="ESP_DATA_DIR", help="Prepared data directory (TFRecord splits + stats.json); local or gs://."
    )


@dataclass(frozen=True)
class PrepareDataSettings:
    input: str = setting(
        "data/jigsaw/jigsaw_trainsplit_union.csv.gz",
        env="ESP_PREPARE_INPUT",
        help="Labelled CSV/JSONL files: comma-separated paths or globs, local or gs:// (.gz read transparently).",
    )
    input_format: str = setting(
        "auto", env="ESP_PREPARE_INPUT_FORMAT", help="File format; auto goes by the file name.", choices=INPUT_FORMATS
    )
    id_column: str = setting(
        "id",
        env="ESP_PREPARE_ID_COLUMN",
        help="Column (CSV) or field (JSONL) holding the comment id; empty: the data has none, ids are derived from the normalised text.",
    )
    text_column: str = setting("comment_text", env="ESP_PREPARE_TEXT_COLUMN", help="Column or field holding the comment text.")
    label_columns: str = setting(
        JIGSAW_LABEL_COLUMNS,
        env="ESP_PREPARE_LABEL_COLUMNS",
        help="Comma-separated label columns (0/1), in model output order; JSONL may nest them in a `labels` object.",
    )
    train_ratio: float = setting(0.8, env="ESP_PREPARE_TRAIN_RATIO", help="Share of comments in the train split.")
    dev_ratio: float = setting(0.1, env="ESP_PREPARE_DEV_RATIO", help="Share in the dev split (early stopping, thresholds).")
    test_ratio: float = setting(0.1, env="ESP_PREPARE_TEST_RATIO", help="Share in the held-out test split (the report).")
    num_shards: int = setting(1, env="ESP_PREPARE_NUM_SHARDS", help="Files per split (0 lets the runner choose).")

    def __post_init__(self) -> None:
        ratios = (self.train_ratio, self.dev_ratio, self.test_ratio)
        require(all(r >= 0 for r in ratios) and math.isclose(sum(ratios), 1.0, abs_tol=1e-6), f"split ratios must be >= 0 and sum to 1, got {ratios}")
        require(self.train_ratio > 0 and self.dev_ratio > 0, "train and dev ratios must be positive")
        require(bool(self.labels()), "label_columns must name at least one column")
        problem = label_problem(self.labels()) or columns_problem(self.id_column.strip(), self.text_column, self.labels())
        require(problem is None, str(problem))
        require(bool(self.patterns()), "input must name at least one path or glob")
        require(self.num_shards >= 0, "num_shards must be >= 0")

    def patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.input.split(",") if p.strip())

    def labels(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.label_columns.split(",") if c.strip())


@dataclass(frozen=True)
class TrainSettings:
    profile: str = setting("default", env="ESP_TRAIN_PROFILE", help="Model size and schedule (docs/training.md).", choices=PROFILE_CHOICES)
    model_name: str = setting(
        "bert", env="ESP_TRAIN_MODEL_NAME", help="Name the model is served under (TF Serving's model name; the warmup requests carry it)."
    )
    export_base_path: str | None = setting(
        None, env="ESP_EXPORT_BASE_PATH", help="TF Serving base path the trained model is exported under (<base>/<version>/); unset means models/<model-name>."
    )
    export_version: int | None = setting(
        None, env="ESP_EXPORT_VERSION", help="Model version to export as; unset means one above the highest present."
    )
    work_dir: str = setting(
        "artifacts/train", env="ESP_TRAIN_WORK_DIR", help="Checkpoints and history go to <work_dir>/<profile>/."
    )
    seed: int = setting(42, env="ESP_TRAIN_SEED", help="Random seed: initialisation, batch order and dropout.")
    pretrained: str | None = setting(
        None,
        env="ESP_TRAIN_PRETRAINED",
        help="Fine-tune from a pretrained BERT: a Hugging Face directory (config.json, model.safetensors, tokenizer.json), a keras-hub preset directory, or a TF checkpoint directory with bert_config.json and vocab.txt. The minilm profile defaults to the fetched all-MiniLM-L6-v2.",
    )
    teacher: str | None = setting(
        None,
        env="ESP_TRAIN_TEACHER",
        help="Distil: comma-separated exported teachers (version or base directories) whose probabilities are soft targets; cross-fit teachers (--cross-fit-fold) each score the rows they did not train on.",
    )
    distill_alpha: float | None = setting(
        None, env="ESP_TRAIN_DISTILL_ALPHA", help="Weight of the teachers' soft targets in the loss, 0..1 (the rest is the labels); unset: the profile's."
    )
    distill_wide: bool | None = setting(
        None,
        env="ESP_TRAIN_DISTILL_WIDE",
        help="Distil: also fit the wide n-gram part on the blend of labels and soft targets (else on the labels alone); unset: the profile's.",
    )
    allow_in_sample_teacher: bool = setting(
        False, env="ESP_TRAIN_ALLOW_IN_SAMPLE_TEACHER", help="Accept a teacher that trained on the rows it gives soft targets for (its outputs there are close to the labels)."
    )
    cross_fit_fold: str | None = setting(
        None, env="ESP_TRAIN_CROSS_FIT_FOLD", help="Train a cross-fit teacher: k/K holds out fold k of K (a hash of the id) of the training split, e.g. 1/2."
    )
    epochs: int | None = setting(None, env="ESP_TRAIN_EPOCHS", help="Override the profile's maximum epochs.")
    max_train_rows: int | None = setting(
        None, env="ESP_TRAIN_MAX_TRAIN_ROWS", help="Override the profile's cap on training rows (0 = all)."
    )
    threads: int = setting(0, env="ESP_TRAIN_THREADS", help="TensorFlow intra/inter-op threads (0 = TensorFlow's choice).")
    cache_dir: str | None = setting(
        None, env="ESP_CACHE_DIR", help="Cache for the unpacked vocabulary, teachers' soft targets and fitted wide parts; unset means <repo>/.cache/esp."
    )

    def __post_init__(self) -> None:
        require(bool(_MODEL_NAME.fullmatch(self.model_name)), f"model_name {self.model_name!r} must be letters, digits, '.', '_' or '-'")
        require(self.export_version is None or self.export_version > 0, "export_version must be a positive integer")
        require(self.distill_alpha is None or 0.0 <= self.distill_alpha <= 1.0, "distill_alpha must be between 0 and 1")
        require(self.distill_alpha is None or bool(self.teacher_dirs()), "distill_alpha needs --teacher")
        require(not self.distill_wide or bool(self.teacher_dirs()), "distill_wide needs --teacher")
        # These two sat after base_path's return, where they never ran: --epochs 0 trained nothing
        # and then failed on the empty history with a traceback.
        require(self.epochs is None or self.epochs > 0, "epochs must be positive")
        require(self.threads >= 0, "threads must be >= 0")
        self.fold()  # raises ValueError, which settings turn into a one-line ConfigError

    def teacher_dirs(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in (self.teacher or "").split(",") if t.strip())

    def fold(self) -> tuple[int, int] | None:
        return parse_cross_fit_fold(self.cross_fit_fold)

    def base_path(self) -> str:
        return self.export_base_path or f"models/{self.model_name}"


@dataclass(frozen=True)
class PretrainedSettings:
    """Where `esp pretrained fetch` unpacks pretrained weights and where `esp train` finds them."""

    pretrained_cache_dir: str | None = setting(
        None, env="ESP_PRETRAINED_CACHE_DIR", help="Directory of verified pretrained models (one subdirectory each); unset means <repo>/.cache/pretrained."
    )


@dataclass(frozen=True)
class ReportSettings:
    report_dir: str = setting(
        "artifacts/report", env="ESP_REPORT_DIR", help="Evaluation report output: metrics JSON, ROC and training-curve PNGs, report.md."
    )
    target_precision: float = setting(
        0.8, env="ESP_TARGET_PRECISION", help="Precision (at natural prevalence) the decision thresholds aim for, 0..1."
    )
    natural_toxic_prevalence: float = setting(
        0.096, env="ESP_NATURAL_TOXIC_PREVALENCE", help="Rate of `toxic` in real traffic; dev/test rows are reweighted to it."
    )
    baselines: bool = setting(
        True, env="ESP_REPORT_BASELINES", help="Also evaluate TF-IDF + logistic regression and alt-profanity-check on the same split."
    )

    def __post_init__(self) -> None:
        require(0.0 < self.target_precision < 1.0, "target_precision must be between 0 and 1")
        require(0.0 < self.natural_toxic_prevalence < 1.0, "natural_toxic_prevalence must be between 0 and 1")
