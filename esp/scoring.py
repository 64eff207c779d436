"""The scoring core: one batch of valid comments in, one outcome per comment out.

The worker and the HTTP API (through esp.engine), the Beam backfill and the CLI all score through
this module; none re-implements it. A `Scorer` is the one abstraction over model backends (TF
Serving over gRPC in `serving.client`, an in-process SavedModel in `serving.saved_model`);
behaviour such as metrics is added by wrapping.

Two functions, by how much a caller trusts its input:
- `score_batch` for texts a person typed at the CLI: any failure raises.
- `score_isolating` for comments from producers: a failure that could be the input's fault or the
  model's (a rejection, NaN or out-of-range outputs, a wrong shape, an unexpected error) is settled
  by a canary of known-good texts. If the canary fails too, the model is at fault: ModelFault,
  which callers treat like an outage, never as the comments' fault. If it passes, the suspects are
  re-scored in halves until each failing comment is alone (at most 2n-1 calls for n suspects), and
  only those that fail alone are Rejected, with the reason. Their neighbours are scored. The canary
  that blames a comment is asked after that comment failed alone, never answered from a pass
  remembered from before: a model that broke a moment ago must not be blamed on a comment.
Model outputs are checked either way: a probability that is NaN, infinite or outside [0, 1], or a
row or label missing, never becomes a score.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from esp.contracts import Comment, ErrorType, Score, utc_now

log = logging.getLogger(__name__)


class ScoringError(Exception):
    """Base of the errors a Scorer raises; each says what was asked and of which server."""


class ModelUnavailable(ScoringError):
    """The model server could not be reached or is overloaded: the infrastructure, not the input."""


class ModelNotFound(ScoringError):
    """The server does not serve the model, version or label asked for."""


class ModelRejected(ScoringError):
    """The model refused this input (INVALID_ARGUMENT): a fault of the batch's contents."""


class ModelServerError(ScoringError):
    """The model server failed on this request (INTERNAL or UNKNOWN): TF Serving answers so when an
    op breaks on one input, and also when it is broken for every input. Ambiguous, so never an
    outage by itself: the canary decides whether the model or the batch is at fault."""


class ModelContractError(ScoringError):
    """The model broke the contract (wrong row count, missing outputs, NaN): a deployment bug."""


class ModelFault(ScoringError):
    """A batch failed and the known-good canary failed too: the model, not the input, is broken.

    Callers treat it like an outage (pause, alert, retry), never as the comments' fault.
    """


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """The model's answer for one batch, rows aligned with the input texts.

    `probabilities[i][j]` is the probability of `labels[j]` for text i. `thresholds` maps each
    label to the model's decision threshold; `truncated[i]` is true when the model read only the
    first part of text i.
    """

    model_name: str
    model_version: int
    labels: tuple[str, ...]
    probabilities: Sequence[Sequence[float]]
    thresholds: dict[str, float]
    truncated: Sequence[bool]

    def __post_init__(self) -> None:
        if len(self.truncated) != len(self.probabilities):
            raise ModelContractError(
                f"model returned {len(self.probabilities)} probability rows but {len(self.truncated)} truncation flags"
            )


class Scorer(Protocol):
    """Scores a batch of raw comment texts with one model version."""

    def predict(self, texts: Sequence[str]) -> ModelOutput: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Checking what the model answered


def output_problems(output: ModelOutput, n: int) -> tuple[str | None, dict[int, str]]:
    """What is wrong with a model's answer for n texts: (a problem of the whole answer, {row: problem}).

    The whole answer is wrong when rows or labels are missing or a threshold is not a probability;
    a row is wrong when one of its probabilities is NaN, infinite or outside [0, 1].
    """
    where = f"model {output.model_name} v{output.model_version}"
    if len(output.probabilities) != n or len(output.truncated) != n:
        return f"{where} returned {len(output.probabilities)} rows for {n} texts", {}
    if not output.labels:
        return f"{where} declares no labels", {}
    for label in output.labels:
        t = output.thresholds.get(label)
        if t is None or not _is_probability(t):
            return f"{where} has no valid threshold for {label!r} ({t!r})", {}
    width = len(output.labels)
    rows: dict[int, str] = {}
    for i, row in enumerate(output.probabilities):
        if len(row) != width:
            return f"{where} returned {len(row)} values for {width} labels", {}
        for label, value in zip(output.labels, row):
            if not _is_probability(value):
                rows[i] = f"{where} answered {label}={value!r}, not a probability in [0, 1]"
                break
    return None, rows


def _is_probability(value: object) -> bool:
    try:
        v = float(value)  # type: ignore[arg-type]  # numpy scalars and plain floats alike
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and 0.0 <= v <= 1.0


def _make_score(comment: Comment, output: ModelOutput, i: int, scored_at: dt.datetime, published_at: dt.datetime | None) -> Score:
    return Score(
        id=comment.id,
        probabilities=dict(zip(output.labels, map(float, output.probabilities[i]))),
        thresholds=output.thresholds,
        model_name=output.model_name,
        model_version=output.model_version,
        truncated=bool(output.truncated[i]),
        scored_at=scored_at,
        published_at=published_at,
    )


def score_batch(
    scorer: Scorer,
    comments: Sequence[Comment],
    *,
    published_at: Sequence[dt.datetime | None] | None = None,
    now: Callable[[], dt.datetime] = utc_now,
) -> list[Score]:
    """Scores a batch; raises on any failure, including an answer that breaks the output contract."""
    if not comments:
        return []
    output = scorer.predict([c.text for c in comments])
    whole, rows = output_problems(output, len(comments))
    if whole or rows:
        raise ModelContractError(whole or next(iter(rows.values())))
    scored_at = now()
    published = published_at if published_at is not None else [None] * len(comments)
    return [_make_score(c, output, i, scored_at, published[i]) for i, c in enumerate(comments)]


# ---------------------------------------------------------------------------------------------
# Scoring comments from producers: isolate the bad ones, never blame the model's faults on them


@dataclasses.dataclass(frozen=True)
class Scored:
    """This comment's score."""

    score: Score


@dataclasses.dataclass(frozen=True)
class Rejected:
    """This comment failed alone while the canary passed: its own fault. `error_type` is an ErrorType."""

    error_type: str
    reason: str


# Known-good texts: ordinary comments every ESP model must score. They are the non-empty texts of
# the export's TF Serving warm-up records (training/export.py; a test keeps the two in step), so
# a model server that loaded a version has already run them once.
CANARY_TEXTS: tuple[str, ...] = (
    "thanks for fixing the citation",
    "you are an idiot and everyone knows it",
    "This article needs more sources. " * 40,
)

# Outages are not the input's fault and are never isolated: they propagate to the caller.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (ModelUnavailable, ModelNotFound)


class Canary:
    """Asks the model to score known-good texts: is the model at fault, or the input?

    Two questions, by what the answer is used for:
    - `failure()`: a hint, answered from a pass remembered for `pass_ttl_s`. score_isolating asks it
      before bisecting, so a batch that meets a model broken for everything is not bisected.
    - `failure(after=t)`: a verdict from a call that began at or after `t` (the moment a comment
      failed alone), the only kind that may blame a comment. A pass from before `t` proves nothing
      about a model that broke since. `fresh=True` is `after=now`.
    Calls are made one at a time, and a caller that waited for another's call takes its verdict
    when that call began after its own `t`: concurrent batches of poison share one call.
    Thread-safe; outages raised by the scorer propagate (and are not remembered).
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        texts: Sequence[str] = CANARY_TEXTS,
        pass_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scorer = scorer
        self.texts = list(texts)
        self.pass_ttl_s = pass_ttl_s
        self.clock = clock
        self._passed_at = -math.inf
        self._verdict_started = -math.inf  # when the last call that answered began
        self._verdict: str | None = None  # ... and what it said
        self._lock = threading.Lock()
        self._one_call = threading.Lock()
        self.checks = 0
        self.failures = 0

    def failure(self, *, after: float | None = None, fresh: bool = False) -> str | None:
        """None when the model scores the canary correctly, else what went wrong (see the class)."""
        if fresh:
            after = self.clock()
        with self._one_call:
            with self._lock:
                if after is None and self.clock() - self._passed_at < self.pass_ttl_s:
                    return None
                if after is not None and self._verdict_started >= after:
                    return self._verdict
                self.checks += 1
            started = self.clock()
            problem = self._ask()
            with self._lock:
                self._verdict_started, self._verdict = started, problem
                if problem is None:
                    self._passed_at = self.clock()
                else:
                    self._passed_at = -math.inf
                    self.failures += 1
        return problem

    def _ask(self) -> str | None:
        try:
            output = self.scorer.predict(self.texts)
        except OUTAGE_ERRORS:
            raise
        except Exception as exc:  # whatever breaks on known-good texts is the model's fault
            return f"{type(exc).__name__}: {exc}"
        whole, rows = output_problems(output, len(self.texts))
        if whole or rows:
            return whole or next(iter(rows.values()))
        return None


def _failure_type(exc: Exception) -> str:
    if isinstance(exc, ModelRejected):
        return ErrorType.MODEL_REJECTED
    if isinstance(exc, ModelServerError):
        return ErrorType.MODEL_SERVER_ERROR
    if isinstance(exc, ModelContractError):
        return ErrorType.MODEL_OUTPUT_INVALID
    return ErrorType.MODEL_ERROR


def score_isolating(
    scorer: Scorer,
    comments: Sequence[Comment],
    *,
    canary: Canary,
    published_at: Sequence[dt.datetime | None] | None = None,
    now: Callable[[], dt.datetime] = utc_now,
) -> list[Scored | Rejected]:
    """One outcome per comment, aligned with `comments` (see the module's docstring).

    Raises ModelUnavailable/ModelNotFound (an outage) and ModelFault (the canary failed too); both
    mean "not the comments' fault: try again later".
    """
    n = len(comments)
    published = list(published_at) if published_at is not None else [None] * n
    outcomes: list[Scored | Rejected | None] = [None] * n
    scored_at = now()

    def attempt(idx: list[int]) -> tuple[tuple[str, str] | None, list[int]]:
        """Scores comments[idx]; fills their Scored outcomes. Returns (a whole failure, the rows that failed)."""
        try:
            output = scorer.predict([comments[i].text for i in idx])
        except OUTAGE_ERRORS:
            raise
        except Exception as exc:  # ambiguous: the input's fault or the model's; the canary decides
            failed_at[0] = canary.clock()
            return (_failure_type(exc), f"{type(exc).__name__}: {exc}" if not isinstance(exc, ScoringError) else str(exc)), []
        whole, rows = output_problems(output, len(idx))
        if whole or rows:
            failed_at[0] = canary.clock()
        if whole:
            return (ErrorType.MODEL_OUTPUT_INVALID, whole), []
        for j, i in enumerate(idx):
            if j not in rows:
                outcomes[i] = Scored(_make_score(comments[i], output, j, scored_at, published[i]))
        failed = [idx[j] for j in sorted(rows)]
        row_reasons.update({idx[j]: reason for j, reason in rows.items()})
        return None, failed

    row_reasons: dict[int, str] = {}
    failed_at = [-math.inf]  # when the latest attempt failed, on the canary's clock
    if n == 0:
        return []
    whole, failed = attempt(list(range(n)))
    if whole is None and not failed:
        return outcomes  # type: ignore[return-value]  # every slot is Scored
    suspects = list(range(n)) if whole else failed
    first_failure = whole[1] if whole else row_reasons[failed[0]]
    canary_failure = canary.failure()  # the hint: a model broken for everything is not bisected
    if canary_failure is not None:
        raise ModelFault(f"{first_failure}; the known-good canary failed too: {canary_failure}")

    def isolate(idx: list[int]) -> None:
        whole, failed = attempt(idx)
        if whole is not None:
            if len(idx) == 1:
                outcomes[idx[0]] = Rejected(*whole)
                return
            mid = len(idx) // 2
            isolate(idx[:mid])
            isolate(idx[mid:])
            return
        if not failed:
            return
        if len(idx) == 1:
            outcomes[idx[0]] = Rejected(ErrorType.MODEL_OUTPUT_INVALID, row_reasons[idx[0]])
            return
        if len(failed) < len(idx):
            isolate(failed)  # the others were scored: the suspects narrowed
            return
        mid = len(idx) // 2
        isolate(idx[:mid])
        isolate(idx[mid:])

    isolate(suspects)
    rejected = sum(isinstance(o, Rejected) for o in outcomes)
    if rejected:
        # The verdict: a canary asked after the last comment failed alone. The hint above may be a
        # pass from before the model broke, and would blame the comments for the model's fault.
        canary_failure = canary.failure(after=failed_at[0])
        if canary_failure is not None:
            raise ModelFault(f"{rejected} of {n} comments failed alone; the known-good canary now fails too: {canary_failure}")
    log.debug("isolated %d of %d comments the model could not score alone", rejected, n)
    return outcomes  # type: ignore[return-value]  # every slot is filled by now
