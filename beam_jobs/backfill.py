"""Backfill: re-score history in bulk with Beam, through the same scoring core as the worker.

    comment files (JSONL, one message body per line; local or gs://)
      -> validate with the comment contract (esp.contracts)  -> dead letters (JSONL, with reason)
      -> RunInference(ScorerModelHandler): TF Serving over gRPC, or the SavedModel in process
      -> the same score records the stream publishes (JSONL)

The model handler wraps ESP's `Scorer` (STYLE.md point 3): batching comes from Beam, sized by the
same max batch size as the worker, and bucketed by text length (Beam's batch_length_fn) so a batch
pads less; a batch the model rejects is split by `score_isolating`, exactly as in the
worker, and the rejected comment goes to the dead letters. DirectRunner locally (always named);
on Dataflow pass the usual flags and `--setup_file=./setup.py` (docs/backfill.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.options import pipeline_options

from esp.contracts import Comment, InvalidComment, Score, Stage, parse_comment, rfc3339, utc_now
from esp.scoring import Canary, Rejected, Scored, Scorer, score_isolating
from esp.settings import ModelClientSettings

log = logging.getLogger(__name__)

SCORES = "scores"
DEAD_LETTERS = "dead_letters"
# Text-length buckets (characters) for Beam's length-aware batching: comments of one bucket share
# a batch. The shipped comments: median about 200 characters, 95th percentile about 1,300.
LENGTH_BUCKETS = [64, 128, 256, 512, 1024]


@dataclasses.dataclass(frozen=True)
class BackfillConfig:
    input: str
    output: str
    backend: str = "tfserving"  # or "saved_model"
    saved_model_dir: str | None = None
    client: ModelClientSettings = dataclasses.field(default_factory=ModelClientSettings)
    max_batch_size: int = 32
    max_body_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        # Backend and model options are checked where scorers are made (serving.scorers), once.
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")


def _text_length(comment: Comment) -> int:
    return len(comment.text)


class ScorerModelHandler(ModelHandler[Comment, "Score | Rejected", Scorer]):
    """RunInference over ESP's Scorer; each result is a Score, or the Rejected reason for a comment."""

    def __init__(self, config: BackfillConfig) -> None:
        super().__init__(
            min_batch_size=1,
            max_batch_size=config.max_batch_size,
            batch_length_fn=_text_length,
            batch_bucket_boundaries=LENGTH_BUCKETS,
        )
        self._config = config
        self._canary: Canary | None = None  # made per process, beside the model it checks

    def load_model(self) -> Scorer:
        from serving.scorers import make_scorer

        cfg = self._config
        return make_scorer(cfg.backend, cfg.client, saved_model_dir=cfg.saved_model_dir)

    def run_inference(
        self, batch: Sequence[Comment], model: Scorer, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        if self._canary is None or self._canary.scorer is not model:
            self._canary = Canary(model)
        for comment, outcome in zip(batch, score_isolating(model, batch, canary=self._canary)):
            yield PredictionResult(example=comment, inference=outcome.score if isinstance(outcome, Scored) else outcome)

    def get_metrics_namespace(self) -> str:
        return "esp_backfill"


def _validate(line: str, max_body_bytes: int) -> Iterable[Any]:
    body = line.encode("utf-8", errors="surrogateescape")
    try:
        yield parse_comment(body, max_body_bytes=max_body_bytes)
    except InvalidComment as exc:
        yield beam.pvalue.TaggedOutput(DEAD_LETTERS, _dead_letter(line, Stage.VALIDATE, exc.error_type, exc.reason))


def _dead_letter(body: str, stage: str, error_type: str, reason: str) -> str:
    # A file has no attributes: the dead letter is one JSON line with the original body and why.
    return json.dumps(
        {"body": body, "esp_stage": stage, "esp_error_type": error_type, "esp_reason": reason, "esp_time": rfc3339(utc_now())},
        ensure_ascii=False,
    )


def _split_result(result: PredictionResult) -> Iterable[Any]:
    if isinstance(result.inference, Score):
        yield result.inference.to_json_bytes().decode("utf-8")
        return
    comment: Comment = result.example
    rejected: Rejected = result.inference
    yield beam.pvalue.TaggedOutput(
        DEAD_LETTERS,
        _dead_letter(comment.to_json_bytes().decode("utf-8"), Stage.SCORE, rejected.error_type, rejected.reason),
    )


def build(pipeline: beam.Pipeline, config: BackfillConfig) -> dict[str, beam.PCollection]:
    lines = pipeline | "Read" >> beam.io.ReadFromText(config.input)
    valid = (
        lines
        | "SkipBlank" >> beam.Filter(lambda line: line.strip() != "")
        | "Validate" >> beam.FlatMap(_validate, config.max_body_bytes).with_outputs(DEAD_LETTERS, main="comments")
    )
    results = (
        valid.comments
        | "Score" >> RunInference(ScorerModelHandler(config))
        | "Split" >> beam.FlatMap(_split_result).with_outputs(DEAD_LETTERS, main=SCORES)
    )
    dead = (valid[DEAD_LETTERS], results[DEAD_LETTERS]) | "AllDeadLetters" >> beam.Flatten()
    results[SCORES] | "WriteScores" >> beam.io.WriteToText(f"{config.output}/scores", file_name_suffix=".jsonl")
    dead | "WriteDeadLetters" >> beam.io.WriteToText(f"{config.output}/dead-letters", file_name_suffix=".jsonl")
    return {SCORES: results[SCORES], DEAD_LETTERS: dead}


def run(config: BackfillConfig, beam_args: Sequence[str] = ()) -> None:
    """Runs the backfill to completion (DirectRunner unless `beam_args` name another runner)."""
    options: PipelineOptions = pipeline_options(beam_args)
    with beam.Pipeline(options=options) as pipeline:
        build(pipeline, config)


def summarize(output: str) -> tuple[int, int]:
    """(scores, dead letters) written under `output`, counted from the files."""
    from apache_beam.io.filesystems import FileSystems

    def count(prefix: str) -> int:
        total = 0
        for match in FileSystems.match([f"{output}/{prefix}*"])[0].metadata_list:
            with FileSystems.open(match.path) as f:
                total += sum(1 for line in f.read().splitlines() if line.strip())
        return total

    return count("scores"), count("dead-letters")
