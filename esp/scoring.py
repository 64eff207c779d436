"""The scoring core: one batch of valid comments in, one Score per comment out.

The worker, the Beam backfill and the CLI all score through `score_batch`; none re-implements it.
A `Scorer` is the one abstraction over model backends (TF Serving over gRPC in `serving.client`,
an in-process SavedModel in `serving.saved_model`); behaviour such as metrics is added by wrapping.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Protocol

from esp.contracts import Comment, Score, utc_now


class ScoringError(Exception):
    """Base of the errors a Scorer raises; each says what was asked and of which server."""


class ModelUnavailable(ScoringError):
    """The model server could not be reached or is overloaded: the infrastructure, not the input."""


class ModelNotFound(ScoringError):
    """The server does not serve the model, version or label asked for."""


class ModelRejected(ScoringError):
    """The model refused this input (INVALID_ARGUMENT): a fault of the batch's contents."""


class ModelContractError(ScoringError):
    """The model broke the contract (wrong row count, missing outputs): a deployment bug."""


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


def score_batch(
    scorer: Scorer,
    comments: Sequence[Comment],
    *,
    published_at: Sequence[dt.datetime | None] | None = None,
    now: Callable[[], dt.datetime] = utc_now,
) -> list[Score]:
    """Scores a batch; checks the model answered every comment exactly once."""
    if not comments:
        return []
    output = scorer.predict([c.text for c in comments])
    if len(output.probabilities) != len(comments):
        raise ModelContractError(
            f"model {output.model_name} v{output.model_version} returned {len(output.probabilities)} rows "
            f"for {len(comments)} comments"
        )
    scored_at = now()
    published = published_at if published_at is not None else [None] * len(comments)
    return [
        Score(
            id=comment.id,
            probabilities=dict(zip(output.labels, map(float, row))),
            thresholds=output.thresholds,
            model_name=output.model_name,
            model_version=output.model_version,
            truncated=bool(trunc),
            scored_at=scored_at,
            published_at=pub,
        )
        for comment, row, trunc, pub in zip(comments, output.probabilities, output.truncated, published)
    ]


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A comment the model refused even alone: isolated by splitting its batch."""

    index: int
    reason: str


def score_isolating_rejects(
    scorer: Scorer,
    comments: Sequence[Comment],
    *,
    published_at: Sequence[dt.datetime | None] | None = None,
    now: Callable[[], dt.datetime] = utc_now,
) -> tuple[list[Score | None], list[Rejected]]:
    """Scores a batch; when the model rejects it, splits it in halves until each bad comment is alone.

    Returns one slot per comment (None for rejected ones) and the rejected comments with the
    model's reason, so one bad comment never costs its neighbours a delivery attempt. Errors other
    than ModelRejected (the server is down, say) propagate untouched: they are not the input's fault.
    """
    published = list(published_at) if published_at is not None else [None] * len(comments)
    results: list[Score | None] = [None] * len(comments)
    rejected: list[Rejected] = []

    def solve(lo: int, hi: int) -> None:
        try:
            scores = score_batch(scorer, comments[lo:hi], published_at=published[lo:hi], now=now)
        except ModelRejected as exc:
            if hi - lo == 1:
                rejected.append(Rejected(index=lo, reason=str(exc)))
                return
            mid = (lo + hi) // 2
            solve(lo, mid)
            solve(mid, hi)
            return
        results[lo:hi] = scores

    if comments:
        solve(0, len(comments))
    return results, rejected
