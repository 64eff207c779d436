"""Backfill: re-score history in bulk with Beam, through the same scoring core as the worker.

    comment files (JSONL message bodies; local or gs://)   or   a BigQuery table / query
      -> validate with the comment contract (esp.contracts)    -> dead letters, with reason
      -> Reshuffle (one file is one split; spreads the work over every worker)
      -> RunInference(ScorerModelHandler): TF Serving over gRPC, or the SavedModel in process
      -> the same score records the stream publishes
      -> files, and/or a BigQuery scores table (staging + MERGE), and/or the scores topic

The model handler wraps ESP's `Scorer` (STYLE.md point 3): Beam hands it windows of comments, which
it sorts by text length and cuts into batches of the worker's max batch size so a batch pads little;
a batch the model rejects is split by `score_isolating`, exactly as in the worker, and the rejected
comment goes to the dead letters. Every DoFn holds only picklable
configuration and builds its clients in `setup`, so the job runs on the multi-process DirectRunner
and on Dataflow alike (docs/backfill.md).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import bigquery as bq
from beam_jobs.options import new_pipeline, pipeline_options
from esp.batcher import length_sorted_batches
from esp.contracts import (
    MAX_ID_CHARS,
    Comment,
    ErrorType,
    InvalidComment,
    Score,
    Stage,
    comment_from_fields,
    parse_comment,
    utc_now,
)
from esp.errors import EspError
from esp.scoring import Canary, Rejected, Scored, Scorer, score_isolating
from esp.settings import BackfillSettings, BigQuerySettings, ModelClientSettings, PubSubSettings

log = logging.getLogger(__name__)

SCORES = "scores"
DEAD_LETTERS = "dead_letters"
NAMESPACE = bq.METRICS_NAMESPACE
# Comments Beam hands the model handler at once, to be sorted by length and cut into batches of
# --max-batch-size. Beam's own length buckets (ModelHandler's batch_length_fn) are not used: Beam
# 2.77 applies them only on its stateful, time-bounded batching path, so on a bounded pipeline every
# batch mixed lengths and padded to its longest comment (docs/backfill.md, Benchmark). A window
# holds at most 1,024 x --max-body-bytes (64 MiB at the default 64 KiB) per worker thread. An outage
# that outlasts the model client's retries fails the bundle, as it did with batches of 32 (Dataflow
# retries the bundle whole).
GROUPING_WINDOW = 1024
# Comments per shuffled element: enough to make the shuffle's per-element cost vanish, few enough that
# a file's comments still spread over every worker (docs/backfill.md, Benchmark).
SHUFFLE_CHUNK = 256
UTF8_BOM = b"\xef\xbb\xbf"
# Attributes added to the stream's own score attributes when the backfill publishes a score, so
# consumers can tell the two apart (a subscription filter: `attributes.source = "backfill"`).
ATTR_SOURCE = "source"
SOURCE_BACKFILL = "backfill"
ATTR_RUN = "backfill_run"
# Most publishes one worker leaves unconfirmed before it waits: bounds memory and duplicates on retry.
MAX_UNCONFIRMED_PUBLISHES = 5000


@dataclasses.dataclass(frozen=True)
class BackfillConfig:
    """What to read, how to score, where to write. One source, at least one sink for scores."""

    input: str | None = None  # JSONL files
    output: str | None = None  # directory for scores-*.jsonl and dead-letters-*.jsonl
    bq_table: str | None = None
    bq_query: str | None = None
    bq_scores_table: str | None = None
    bq_dead_letters_table: str | None = None  # default: <scores table>_dead_letters
    bq_staging_dataset: str | None = None  # default: the scores table's dataset
    publish_scores: bool = False
    backend: str = "tfserving"  # or "saved_model"
    saved_model_dir: str | None = None
    client: ModelClientSettings = dataclasses.field(default_factory=ModelClientSettings)
    max_batch_size: int = 32
    max_body_bytes: int = 64 * 1024
    bigquery: BigQuerySettings = dataclasses.field(default_factory=BigQuerySettings)
    backfill: BackfillSettings = dataclasses.field(default_factory=BackfillSettings)
    pubsub: PubSubSettings = dataclasses.field(default_factory=PubSubSettings)
    run_id: str = dataclasses.field(default_factory=lambda: new_run_id())

    def __post_init__(self) -> None:
        # Backend and model options are checked where scorers are made (serving.scorers), once.
        from esp.errors import ConfigError

        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1")
        sources = [s for s in (self.input, self.bq_table, self.bq_query) if s]
        if len(sources) != 1:
            raise ConfigError("give exactly one source: --input FILES, --bq-table TABLE or --bq-query SQL")
        if not (self.output or self.bq_scores_table or self.publish_scores):
            raise ConfigError("give somewhere to put the scores: --output DIR, --bq-scores-table TABLE and/or --publish-scores")
        if self.bq_dead_letters_table and not self.bq_scores_table:
            raise ConfigError("--bq-dead-letters-table goes with --bq-scores-table")
        if not (self.output or self.bq_scores_table):
            raise ConfigError("--publish-scores alone has nowhere for dead letters: add --output DIR or --bq-scores-table")

    @property
    def source_description(self) -> str:
        if self.input:
            return self.input
        return self.bq_table or "query"


def new_run_id() -> str:
    """Sortable and unique: names the run's staging tables and marks its rows and messages."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "_" + uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------------------------------
# Dead letters


@dataclasses.dataclass(frozen=True)
class DeadRow:
    """A row the backfill could not score, with why; written to files or the dead-letters table."""

    body: bytes
    stage: str
    error_type: str
    reason: str
    time: dt.datetime
    id: str | None = None

    def text(self) -> str:
        return self.body.decode("utf-8", errors="backslashreplace")

    def to_json_line(self) -> str:
        record: dict[str, Any] = {
            "body": self.text(),
            "esp_stage": self.stage,
            "esp_error_type": self.error_type,
            "esp_reason": self.reason,
            "esp_time": self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if self.error_type == ErrorType.INVALID_UTF8:
            # The text above is lossy for bytes that are not UTF-8; keep the exact bytes too.
            record["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return json.dumps(record, ensure_ascii=False)

    def to_row(self, run_id: str, source: str) -> dict[str, Any]:
        body, reason = self.text(), self.reason
        encoded = body.encode("utf-8")
        if len(encoded) > bq.MAX_DEAD_LETTER_BODY_BYTES:
            body = encoded[: bq.MAX_DEAD_LETTER_BODY_BYTES].decode("utf-8", errors="ignore")
            reason += (
                f" [body cut to its first {len(body.encode('utf-8'))} bytes for the table: the input is "
                f"{len(self.body)} bytes, sha256 {hashlib.sha256(self.body).hexdigest()}]"
            )
        return {
            "id": self.id,
            "body": body,
            "stage": self.stage,
            "error_type": self.error_type,
            "reason": reason,
            "dead_lettered_at": self.time,
            "run_id": run_id,
            "source": source,
        }


# ---------------------------------------------------------------------------------------------
# Progress: per worker process, logged every few seconds; totals come from Beam's metrics.


class _Progress:
    """Counts of this process, logged at most every `interval_s`. Only for people reading logs."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._counts = {"read": 0, "scored": 0, "dead-lettered": 0}
        self._start = time.monotonic()
        self._last = self._start

    def add(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            self._last = now
            counts = dict(self._counts)
        rate = counts["scored"] / max(now - self._start, 1e-9)
        log.info(
            "backfill progress (pid %d): read %d, scored %d, dead-lettered %d, %.0f scored/s",
            os.getpid(), counts["read"], counts["scored"], counts["dead-lettered"], rate,
        )


_progress_by_interval: dict[float, _Progress] = {}
_progress_lock = threading.Lock()


def _progress(interval_s: float) -> _Progress:
    # One per worker process (not shared across processes, nothing depends on it but the log).
    with _progress_lock:
        if interval_s not in _progress_by_interval:
            _progress_by_interval[interval_s] = _Progress(interval_s)
        return _progress_by_interval[interval_s]


class _Counted(beam.DoFn):
    """Base of the DoFns that count rows: Beam counters (totals) plus the per-process progress log."""

    def __init__(self, progress_interval_s: float) -> None:
        self._interval = progress_interval_s

    def setup(self) -> None:
        self._progress = _progress(self._interval)
        self._read = Metrics.counter(NAMESPACE, "rows_read")
        self._scored = Metrics.counter(NAMESPACE, "scored")
        self._dead = Metrics.counter(NAMESPACE, "dead_lettered")

    def count(self, what: str) -> None:
        {"read": self._read, "scored": self._scored, "dead-lettered": self._dead}[what].inc()
        self._progress.add(what)


# ---------------------------------------------------------------------------------------------
# Validation: every row goes through the comment contract (esp.contracts); nothing else decides.


class ValidateLine(_Counted):
    """A JSONL line (raw bytes) -> Comment, or a dead letter with the contract's reason."""

    def __init__(self, max_body_bytes: int, progress_interval_s: float) -> None:
        super().__init__(progress_interval_s)
        self._max = max_body_bytes

    def process(self, line: bytes) -> Iterator[Any]:
        # A file's byte order mark reaches its first line. Lines arrive without their position, so
        # it is dropped from any line: a BOM is never a JSON body's first character otherwise.
        line = line.removeprefix(UTF8_BOM)
        if not line.strip():
            return
        self.count("read")
        try:
            yield parse_comment(line, max_body_bytes=self._max)
        except InvalidComment as exc:
            self.count("dead-lettered")
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadRow(line, Stage.VALIDATE, exc.error_type, exc.reason, utc_now()))


class ValidateRow(_Counted):
    """A BigQuery row {"id", "text"} -> Comment, or a dead letter with the contract's reason.

    An INT64 id is read as its decimal string (warehouse ids often are integers); every other
    type is left for the contract to judge.
    """

    def __init__(self, max_body_bytes: int, progress_interval_s: float) -> None:
        super().__init__(progress_interval_s)
        self._max = max_body_bytes

    def process(self, row: dict[str, Any]) -> Iterator[Any]:
        self.count("read")
        cid, text = row["id"], row["text"]
        if isinstance(cid, int) and not isinstance(cid, bool):
            cid = str(cid)
        try:
            yield comment_from_fields(cid, text, max_body_bytes=self._max)
        except InvalidComment as exc:
            self.count("dead-lettered")
            body = _row_body(cid, text)
            # Only an id the contract could take goes into the id column: a source row's id can be as
            # large as BigQuery holds (100 MB), and a dead letter must fit in one 10 MB write (the
            # body keeps the start of it).
            readable_id = cid if isinstance(cid, str) and len(cid) <= MAX_ID_CHARS else None
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS, DeadRow(body, Stage.VALIDATE, exc.error_type, exc.reason, utc_now(), readable_id)
            )


# Marks the failure CheckCompressedEnd raises, so `run` can find it in whatever a runner re-raises
# (the DoFn's own exception in process, its text from another process or Dataflow).
TRUNCATED_INPUT = "esp-input-cut-short: "


class InputCutShort(Exception):
    """A compressed input file ends early or is corrupt (CheckCompressedEnd)."""


class CheckCompressedEnd(beam.DoFn):
    """Fails the job on a compressed input file that ends before its end-of-stream marker.

    Beam's text source reads a gzip (or bzip2, xz) stream up to where its bytes stop and ends there
    without a word, so a file cut short by an interrupted copy would be scored in part and the run
    reported as a success. Reading each compressed file through Python's own decompressors here
    raises instead. It costs one more decompression of the compressed inputs, a few thousandths of
    what scoring them costs, and runs beside the reading, on the workers, not on the launcher.
    Deflate and zstd have no file object that checks the end, so they go through `_read_to_end`.
    """

    def process(self, metadata: Any) -> Iterator[None]:
        import bz2
        import gzip
        import lzma
        import zlib

        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        import zstandard

        def read_through(opener: Callable[[Any], Any]) -> Callable[[Any], None]:
            def read(raw: Any) -> None:
                with opener(raw) as stream:
                    while stream.read(1 << 20):
                        pass

            return read

        checks: dict[str, Callable[[Any], None]] = {
            CompressionTypes.GZIP: read_through(lambda raw: gzip.GzipFile(fileobj=raw)),
            CompressionTypes.BZIP2: read_through(bz2.BZ2File),
            CompressionTypes.LZMA: read_through(lzma.LZMAFile),
            # The decompressors Beam's CompressedFile uses for these two.
            CompressionTypes.DEFLATE: lambda raw: _read_to_end(raw, zlib.decompressobj),
            CompressionTypes.ZSTD: lambda raw: _read_to_end(raw, zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj),
        }
        check = checks.get(CompressionTypes.detect_compression_type(metadata.path))
        if check is None:
            return
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            try:
                check(raw)
            except (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
                raise InputCutShort(f"{TRUNCATED_INPUT}{metadata.path}: {exc}") from None
        yield from ()


def _read_to_end(raw: Any, new_decompressor: Callable[[], Any], chunk: int = 4096) -> None:
    """Decompresses `raw` as Beam does (a stream followed by more bytes starts another stream) and
    raises EOFError when the last stream has no end. Small chunks bound what one call can inflate to
    (a zstd block of a few bytes may stand for 128 KiB)."""
    decompressor, seen = new_decompressor(), False
    while buf := (decompressor.unused_data if decompressor.eof else b"") or raw.read(chunk):
        if decompressor.eof:
            decompressor = new_decompressor()
        seen = True
        decompressor.decompress(buf)
    if seen and not decompressor.eof:
        raise EOFError("the compressed stream ends before its end-of-stream marker")


def _input_cut_short(exc: BaseException) -> str | None:
    """The one-line reason when `exc` (as a runner re-raised it) is CheckCompressedEnd's failure."""
    text = str(exc)
    at = text.find(TRUNCATED_INPUT)
    if at < 0:
        return None
    reason = text[at + len(TRUNCATED_INPUT) :].splitlines()[0]
    return reason.split(" [while running")[0].strip()


def _model_failure(exc: BaseException) -> str | None:
    """The one-line reason when `exc` is the model server failing the job (unreachable past the client's
    retry budget, or not serving the model), whether the runner re-raised the exception itself (in
    process) or its text (other processes, Dataflow). A rerun scores the rest: the outputs are
    keyed by comment id."""
    from esp.scoring import ModelContractError, ModelNotFound, ModelUnavailable

    kinds = (ModelUnavailable, ModelNotFound, ModelContractError)
    if isinstance(exc, kinds):
        text = str(exc)
    else:
        text = str(exc)
        at = max(text.rfind(f"{kind.__module__}.{kind.__name__}: ") for kind in kinds)
        if at < 0:
            return None
        text = text[text.index(": ", at) + 2 :]
    return text.splitlines()[0].split(" [while running")[0].strip() if text else None


def _row_body(cid: Any, text: Any) -> bytes:
    """The row as the JSON a dead letter keeps, whatever its columns hold (text that UTF-8 cannot
    carry, such as a lone surrogate, is kept as JSON escapes; unknown types as their str())."""
    row = {"id": cid, "text": text}
    try:
        return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(row, ensure_ascii=True, default=str).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Scoring


def _configure_tensorflow_threads(threads: int) -> None:
    """Caps TensorFlow's thread pools in this worker process (before the model loads)."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        # TensorFlow already ran an op in this process (e.g. the in-memory DirectRunner in a test).
        log.debug("TensorFlow threads already configured in this process")


def _local_model_dir(path: str) -> str:
    """A local copy of a model on gs:// (or any Beam filesystem); local paths are used in place."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        return path
    target = tempfile.mkdtemp(prefix="esp-model-")
    base = path.rstrip("/")
    for match in FileSystems.match([base + "/**"])[0].metadata_list:
        rel = match.path[len(base) + 1 :]
        dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with FileSystems.open(match.path) as src, open(dest, "wb") as out:
            out.write(src.read())
    log.info("copied the model from %s to %s", path, target)
    return target


class ScorerModelHandler(ModelHandler[Comment, "Score | Rejected", Scorer]):
    """RunInference over ESP's Scorer; each result is a Score, or the Rejected reason for a comment."""

    def __init__(self, config: BackfillConfig) -> None:
        # Fixed-size windows (a bundle's last one may be short). Beam's adaptive sizing starts at 1 and
        # aims at a 5% fixed-cost share, which this model reaches with small batches, yet a BERT scores
        # 3x faster per comment at 32 than at 1 (docs/DESIGN.md): measured here, adaptive batches ran
        # the backfill at about half the model's throughput (docs/backfill.md).
        window = max(GROUPING_WINDOW, config.max_batch_size)
        super().__init__(min_batch_size=window, max_batch_size=window)
        self._config = config
        self._canary: Canary | None = None  # made per process, beside the model it checks

    def load_model(self) -> Scorer:
        from serving.scorers import make_scorer

        cfg = self._config
        model_dir = cfg.saved_model_dir
        if cfg.backend == "saved_model":
            _configure_tensorflow_threads(cfg.backfill.tf_threads)
            model_dir = _local_model_dir(model_dir) if model_dir else model_dir
        return make_scorer(cfg.backend, cfg.client, saved_model_dir=model_dir)

    def run_inference(
        self, batch: Sequence[Comment], model: Scorer, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        if self._canary is None or self._canary.scorer is not model:
            self._canary = Canary(model)
        outcomes: list[Scored | Rejected | None] = [None] * len(batch)
        for indices in length_sorted_batches([len(c.text) for c in batch], self._config.max_batch_size):
            scored = score_isolating(model, [batch[i] for i in indices], canary=self._canary)
            for i, outcome in zip(indices, scored):
                outcomes[i] = outcome
        for comment, outcome in zip(batch, outcomes):
            yield PredictionResult(example=comment, inference=outcome.score if isinstance(outcome, Scored) else outcome)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class SplitResults(_Counted):
    def process(self, result: PredictionResult) -> Iterator[Any]:
        if isinstance(result.inference, Score):
            self.count("scored")
            yield result.inference
            return
        comment: Comment = result.example
        rejected: Rejected = result.inference
        self.count("dead-lettered")
        yield beam.pvalue.TaggedOutput(
            DEAD_LETTERS,
            DeadRow(comment.to_json_bytes(), Stage.SCORE, rejected.error_type, rejected.reason, utc_now(), comment.id),
        )


# ---------------------------------------------------------------------------------------------
# Sinks


def _each(chunk: list[Any]) -> list[Any]:
    return chunk


def score_row(score: Score, run_id: str) -> dict[str, Any]:
    """A Score as a row of the scores table: one column per label, in the model's order."""
    # Checked here, where labels and fixed columns share one dict: a label `id` or `flags` (a model
    # exported elsewhere) would otherwise overwrite the comment id or be overwritten by the flags,
    # and the table would never hear of it. One check per label set, not per row.
    _check_labels(tuple(score.probabilities))
    return {
        "id": score.id,
        **{label: float(p) for label, p in score.probabilities.items()},
        "flags": score.flags,
        "truncated": score.truncated,
        "model_name": score.model_name,
        "model_version": score.model_version,
        "scored_at": score.scored_at,
        "run_id": run_id,
    }


_check_labels = functools.lru_cache(maxsize=64)(bq.check_labels)


def _columns_for_score_row(row: dict[str, Any]) -> list[bq.Column]:
    labels = [k for k in row if k not in bq.SCORES_FIXED_COLUMNS]
    return bq.scores_columns(labels)


def _dead_letter_columns(_: dict[str, Any]) -> list[bq.Column]:
    return list(bq.DEAD_LETTER_SCHEMA)


def score_attributes(score: Score, run_id: str) -> dict[str, str]:
    """The stream's score attributes, plus the two that mark a backfill's message."""
    return {**score.attributes(), ATTR_SOURCE: SOURCE_BACKFILL, ATTR_RUN: run_id}


class PublishScores(beam.DoFn):
    """Publishes scores to the scores topic; a bundle finishes only once Pub/Sub confirmed all of it.

    A failed bundle is retried whole, so a consumer may see a score twice: it dedupes on
    (id, model version), as it already must for the stream (at-least-once).
    """

    def __init__(self, settings: PubSubSettings, run_id: str) -> None:
        self._settings = settings
        self._run_id = run_id

    def setup(self) -> None:
        from google.cloud.pubsub_v1.types import BatchSettings

        from esp.pubsub import publisher_client

        self._client = publisher_client(
            self._settings, batch_settings=BatchSettings(max_messages=1000, max_bytes=4 * 1024 * 1024, max_latency=0.05)
        )
        self._topic = self._settings.topic_path(self._settings.scores_topic)
        self._published = Metrics.counter(NAMESPACE, "published")

    def start_bundle(self) -> None:
        self._futures: list[Any] = []

    def process(self, score: Score) -> None:
        self._futures.append(self._client.publish(self._topic, score.to_json_bytes(), **score_attributes(score, self._run_id)))
        if len(self._futures) >= MAX_UNCONFIRMED_PUBLISHES:
            self._confirm()

    def _confirm(self) -> None:
        timeout = self._settings.pubsub_timeout_s * 4
        for future in self._futures:
            future.result(timeout=timeout)  # raises: the bundle fails and is retried
        self._published.inc(len(self._futures))
        self._futures = []

    def finish_bundle(self) -> None:
        self._confirm()

    def teardown(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.stop()


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class _BigQueryPlan:
    job_project: str
    source: bq.BigQuerySource | None
    sink: bq.SinkPlan | None


def _plan_bigquery(config: BackfillConfig) -> _BigQueryPlan:
    """Resolves table names (pure: no network, so the job graph can be built offline)."""
    from esp.errors import ConfigError

    default_project = config.bigquery.bigquery_project
    scores = (
        bq.TableRef.parse(config.bq_scores_table, default_project, what="--bq-scores-table") if config.bq_scores_table else None
    )
    table = bq.TableRef.parse(config.bq_table, default_project, what="--bq-table") if config.bq_table else None
    job_project = default_project or (scores.project if scores else None) or (table.project if table else None)
    staging = None
    if config.bq_staging_dataset:
        staging = bq.DatasetRef.parse(config.bq_staging_dataset, job_project)
    elif scores is not None:
        staging = bq.DatasetRef(scores.project, scores.dataset)
    source = None
    if config.bq_table or config.bq_query:
        snapshot = None
        if config.bq_query:
            if staging is None or job_project is None:
                raise ConfigError("--bq-query needs a dataset for its result: give --bq-scores-table or --bq-staging-dataset")
            snapshot = staging.table(f"esp_backfill_{config.run_id}_source")
        source = bq.BigQuerySource(
            id_column=config.backfill.id_column,
            text_column=config.backfill.text_column,
            table=table,
            query=config.bq_query,
            materialize_to=snapshot,
        )
    sink = None
    if scores is not None and staging is not None:
        dead_spec = config.bq_dead_letters_table or f"{scores}_dead_letters"
        dead = bq.TableRef.parse(dead_spec, scores.project, what="--bq-dead-letters-table")
        sink = bq.SinkPlan(
            scores=scores,
            staging=staging.table(f"esp_backfill_{config.run_id}_scores"),
            dead_letters=dead,
            source_snapshot=source.materialize_to if source else None,
        )
    return _BigQueryPlan(job_project or "", source, sink)


def build(pipeline: beam.Pipeline, config: BackfillConfig) -> dict[str, beam.PCollection]:
    interval = config.backfill.progress_interval_s
    plan = _plan_bigquery(config)
    if config.input:
        # Bytes, so a line that is not UTF-8 is the contract's to reject, not a crash. No validation
        # at construction: preflight() checks the pattern, and a job graph builds offline.
        lines = pipeline | "ReadFiles" >> beam.io.ReadFromText(config.input, coder=beam.coders.BytesCoder(), validate=False)
        _ = pipeline | "MatchCompressed" >> fileio.MatchFiles(config.input) | "CheckCompressedEnd" >> beam.ParDo(CheckCompressedEnd())
        valid = lines | "Validate" >> beam.ParDo(ValidateLine(config.max_body_bytes, interval)).with_outputs(
            DEAD_LETTERS, main="comments"
        )
    else:
        if plan.source is None:
            from esp.errors import ConfigError

            raise ConfigError("the plan has neither input files nor a BigQuery source")
        rows = (
            pipeline
            | "Source" >> beam.Create([plan.source])
            | "PlanRead" >> beam.ParDo(bq.PlanRead(config.bigquery, plan.job_project, config.bigquery.bigquery_staging_expiration_h))
            | "SpreadStreams" >> beam.Reshuffle()
            | "ReadStreams" >> beam.ParDo(bq.ReadStream(config.bigquery, plan.source.id_column, plan.source.text_column))
        )
        valid = rows | "Validate" >> beam.ParDo(ValidateRow(config.max_body_bytes, interval)).with_outputs(
            DEAD_LETTERS, main="comments"
        )
    results = (
        valid.comments
        # One file (or one stream) is read by one worker: spread the comments before the model. They
        # cross the shuffle in chunks: per element, a shuffle costs about as much CPU as the model.
        | "Chunk" >> beam.BatchElements(min_batch_size=SHUFFLE_CHUNK, max_batch_size=SHUFFLE_CHUNK)
        | "Spread" >> beam.Reshuffle()
        | "Unchunk" >> beam.FlatMap(_each)
        | "Score" >> RunInference(ScorerModelHandler(config))
        | "Split" >> beam.ParDo(SplitResults(interval)).with_outputs(DEAD_LETTERS, main=SCORES)
    )
    scores = results[SCORES]
    dead = (valid[DEAD_LETTERS], results[DEAD_LETTERS]) | "AllDeadLetters" >> beam.Flatten()

    if config.output:
        (scores | "ScoreJson" >> beam.Map(lambda s: s.to_json_bytes().decode("utf-8"))
         | "WriteScores" >> beam.io.WriteToText(f"{config.output}/scores", file_name_suffix=".jsonl"))
        (dead | "DeadLetterJson" >> beam.Map(DeadRow.to_json_line)
         | "WriteDeadLetters" >> beam.io.WriteToText(f"{config.output}/dead-letters", file_name_suffix=".jsonl"))

    if plan.sink is not None:
        sink, settings, run_id = plan.sink, config.bigquery, config.run_id
        score_streams = (
            scores
            | "ScoreRows" >> beam.Map(score_row, run_id)
            | "WriteStaging" >> beam.ParDo(bq.WriteRows(
                settings, plan.job_project, sink.staging, _columns_for_score_row, partition_field="scored_at",
                clustering=(bq.MODEL_VERSION, bq.ID), expiration_h=settings.bigquery_staging_expiration_h, counter="staged"))
        )
        dead_streams = (
            dead
            | "DeadLetterRows" >> beam.Map(DeadRow.to_row, run_id, config.source_description)
            | "WriteDeadLetterRows" >> beam.ParDo(bq.WriteRows(
                settings, plan.job_project, sink.dead_letters, _dead_letter_columns, partition_field="dead_lettered_at",
                counter="dead_letter_rows"))
        )
        (
            pipeline
            | "FinalizeTrigger" >> beam.Create([None])
            | "CommitAndMerge" >> beam.ParDo(
                bq.Finalize(settings, plan.job_project, sink),
                beam.pvalue.AsList(score_streams),
                beam.pvalue.AsList(dead_streams),
            )
        )
    elif plan.source is not None and plan.source.materialize_to is not None:
        log.info("the query's result table %s expires by itself", plan.source.materialize_to)

    if config.publish_scores:
        scores | "PublishScores" >> beam.ParDo(PublishScores(config.pubsub, config.run_id))
    return {SCORES: scores, DEAD_LETTERS: dead}


@dataclasses.dataclass
class Summary:
    read: int = 0
    scored: int = 0
    dead_lettered: int = 0
    published: int = 0
    merged: int = 0
    seconds: float = 0.0
    submitted_only: bool = False  # a job description was written (template), nothing ran here

    @property
    def rate(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.submitted_only:
            return "job description written; nothing ran here"
        parts = [f"read {self.read}", f"scored {self.scored}", f"dead-lettered {self.dead_lettered}"]
        if self.published:
            parts.append(f"published {self.published}")
        if self.merged:
            parts.append(f"merged {self.merged}")
        return ", ".join(parts) + f" in {self.seconds:.1f}s ({self.rate:,.0f} scored/s)"


def _counter(result: Any, name: str) -> int:
    total = 0
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name(name))["counters"]:
        total += counter.committed or 0
    return total


def run(config: BackfillConfig, beam_args: Sequence[str] = ()) -> Summary:
    """Runs the backfill to completion (DirectRunner unless `beam_args` name another runner)."""
    options: PipelineOptions = pipeline_options(beam_args)
    start = time.monotonic()
    pipeline = new_pipeline(options)
    build(pipeline, config)
    try:
        result = pipeline.run()
        if any(a.startswith("--template_location") for a in beam_args):
            return Summary(submitted_only=True, seconds=time.monotonic() - start)
        result.wait_until_finish()
    except Exception as exc:
        cut_short = _input_cut_short(exc)
        if cut_short is not None:
            raise EspError(f"the backfill failed, an input file is cut short or corrupt: {cut_short}") from None
        model_failure = _model_failure(exc)
        if model_failure is not None:
            raise EspError(f"the backfill stopped, the model server failed it: {model_failure}") from None
        raise
    summary = Summary(
        read=_counter(result, "rows_read"),
        scored=_counter(result, "scored"),
        dead_lettered=_counter(result, "dead_lettered"),
        published=_counter(result, "published"),
        merged=_counter(result, "merged"),
        seconds=time.monotonic() - start,
    )
    log.info("backfill %s finished: %s", config.run_id, summary.line())
    return summary


# ---------------------------------------------------------------------------------------------
# Pre-flight: a wrong name or an unreachable service is one line before the job starts.


def preflight(config: BackfillConfig) -> None:
    """Checks that the inputs exist and the services answer; raises EspError/ConfigError with the reason."""
    from esp.errors import ConfigError

    if config.input:
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.match([config.input])[0].metadata_list:
            raise ConfigError(f"--input {config.input!r} matches no file")
    plan = _plan_bigquery(config)
    labels = _check_model_server(config, plan) if config.backend == "tfserving" else _check_saved_model(config, plan)
    if plan.source is not None or plan.sink is not None:
        _check_bigquery(config, plan, labels)
    if config.publish_scores:
        _check_topic(config.pubsub)


def _check_model_server(config: BackfillConfig, plan: _BigQueryPlan) -> tuple[str, ...]:
    """The model server serves the model, and its labels can be columns of the scores table; returns them.

    Without it, an unreachable server surfaced after the client's whole retry budget as Beam's
    traceback, and a label the table cannot take only when the first score arrived.
    """
    from esp.scoring import ScoringError
    from serving.client import TFServingScorer

    scorer = TFServingScorer.from_settings(config.client, retry_budget_s=min(10.0, config.client.model_retry_budget_s))
    try:
        labels = scorer.labels()
    except ScoringError as exc:
        raise EspError(f"the model server cannot score this backfill: {exc}") from None
    finally:
        scorer.close()
    if plan.sink is not None:
        bq.check_labels(labels)
    return labels


def _check_saved_model(config: BackfillConfig, plan: _BigQueryPlan) -> tuple[str, ...] | None:
    """The SavedModel is there, and its labels can be columns of the scores table; returns them.

    Read from saved_model.pb alone (the job loads the model). Without it, a missing model was the
    job's traceback, and a label the table cannot take surfaced when the first score arrived. A
    model on gs:// is left to the job, which copies it anyway.
    """
    from esp.errors import ConfigError
    from esp.scoring import ModelContractError, ModelNotFound
    from serving.saved_model_files import stored_labels

    path = config.saved_model_dir
    if not path or "://" in path:
        return None
    try:
        labels = stored_labels(path, config.client.model_version, config.client.model_signature)
    except (ModelNotFound, ModelContractError) as exc:
        raise ConfigError(f"--saved-model-dir: {exc}") from None
    if plan.sink is not None:
        bq.check_labels(labels)
    return labels


def _check_bigquery(config: BackfillConfig, plan: _BigQueryPlan, labels: Sequence[str] | None) -> None:
    from google.api_core import exceptions as gexc
    from google.api_core.retry import Retry

    from esp.errors import ConfigError, EspError, ServiceUnreachable

    client = bq.rest_client(config.bigquery, plan.job_project)
    # Short: a pre-flight that retries for the client's default ten minutes helps nobody.
    quick = {"retry": Retry(deadline=20.0), "timeout": 10.0}
    where = config.bigquery.bigquery_api_endpoint or "BigQuery"
    try:
        source = plan.source
        if source is not None and source.table is not None:
            table = client.get_table(str(source.table), **quick)
            names = {f.name for f in table.schema}
            missing = [c for c in (source.id_column, source.text_column) if c not in names]
            if missing:
                raise ConfigError(
                    f"table {source.table} has no column {', '.join(missing)} (it has: {', '.join(sorted(names))}); "
                    "see --id-column / --text-column"
                )
        if source is not None and source.query is not None:
            _check_query(client, source, quick)
        datasets = {(t.project, t.dataset) for t in _tables_written(plan)}
        for project, dataset in sorted(datasets):
            client.get_dataset(f"{project}.{dataset}", **quick)
        if plan.sink is not None:
            # The label columns are the model's: checked when the pre-flight could read them (not for a
            # SavedModel on gs://); a label column the table lacks is added before the MERGE.
            _check_existing_table(client, plan.sink.scores, bq.scores_columns(labels or []), quick, addable=labels or ())
            _check_existing_table(client, plan.sink.dead_letters, bq.DEAD_LETTER_SCHEMA, quick)
    except gexc.NotFound as exc:
        raise ConfigError(f"BigQuery: {exc.message}") from None
    except gexc.GoogleAPICallError as exc:
        raise EspError(f"BigQuery at {where}: {exc.message}") from None
    except (gexc.RetryError, OSError) as exc:
        raise ServiceUnreachable(f"cannot reach BigQuery at {where}: {exc}") from None
    finally:
        client.close()


def _check_query(client: Any, source: bq.BigQuerySource, quick: dict[str, Any]) -> None:
    """A dry run of the source query (free on BigQuery): a query that does not parse, or that lacks the
    two columns, is one line here, not a failure inside the job after it started."""
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    from esp.errors import ConfigError

    try:
        job = client.query(source.select_sql, job_config=bigquery.QueryJobConfig(dry_run=True), api_method="QUERY", **quick)
    except gexc.BadRequest as exc:
        raise ConfigError(f"--bq-query: {exc.message}") from None
    if job.schema is None:
        return  # no schema in the answer: the read session names a missing column soon enough
    names = [f.name for f in job.schema]
    missing = [c for c in (source.id_column, source.text_column) if c not in names]
    if missing:
        raise ConfigError(
            f"--bq-query returns no column {', '.join(missing)} (it returns: {', '.join(names) or 'no columns'}); "
            "see --id-column / --text-column"
        )


def _check_existing_table(
    client: Any, table: bq.TableRef, wanted: Sequence[bq.Column], quick: dict[str, Any], *, addable: Sequence[str] = ()
) -> None:
    """An existing table the run writes must take its rows; else the run would fail at its end."""
    from google.api_core import exceptions as gexc

    from esp.errors import ConfigError

    try:
        existing = client.get_table(str(table), **quick)
    except gexc.NotFound:
        return  # the run creates it
    if existing.table_type != "TABLE":
        # A view (or snapshot, external table) can have the right columns, and still take no rows.
        raise ConfigError(f"{table} exists but is a {existing.table_type}, not a table: rows cannot be written to it")
    unfit = bq.unfit_columns(bq.columns_of(existing), wanted, addable=addable)
    if unfit:
        raise ConfigError(
            f"{table} exists but cannot take this run's rows: columns {', '.join(unfit)} "
            f"(it needs {bq.describe_columns(wanted)}; other columns NULLABLE)"
        )


def _tables_written(plan: _BigQueryPlan) -> list[bq.TableRef]:
    tables = []
    if plan.sink is not None:
        tables += [plan.sink.scores, plan.sink.staging, plan.sink.dead_letters]
    if plan.source is not None and plan.source.materialize_to is not None:
        tables.append(plan.source.materialize_to)
    return tables


def _check_topic(settings: PubSubSettings) -> None:
    from esp.pubsub import check_reachable, publisher_client, translate_errors

    check_reachable(settings)
    client = publisher_client(settings)
    topic = settings.topic_path(settings.scores_topic)
    try:
        with translate_errors(settings, f"checking the scores topic {topic}"):
            client.get_topic(request={"topic": topic}, timeout=settings.pubsub_timeout_s)
    finally:
        client.stop()
