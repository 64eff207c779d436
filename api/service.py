"""Scores a request's comments through the shared engine, from asyncio, within the request's deadline.

Every comment of every concurrent request goes to the one `esp.engine.ScoringEngine`, which
micro-batches them (length-grouped) into Predict calls: many single-comment callers cost what one
batched caller costs. This module only turns the engine's outcomes into answers:

- the engine's queue is full (`QueueFull`)                  -> 429 queue_full, Retry-After;
- the model server stayed unavailable until the deadline    -> 503 model_unavailable, Retry-After;
- the engine did not answer by the deadline (plus a margin) -> 504 deadline_exceeded (never hang);
- the model refused one comment (`Rejected`)                 -> that comment's own error, its
  neighbours scored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from api.errors import ApiError, Reason
from esp.contracts import Comment, Score
from esp.engine import QueueFull, Rejected, Scored, Unavailable

log = logging.getLogger(__name__)

# How long past its deadline a request still waits for the engine's own answer (a 503 with the
# reason) before answering 504 itself: the engine resolves at the deadline, this is only a guard.
DEADLINE_MARGIN_S = 1.0
SHUTTING_DOWN = "shutting down"  # the engine's Unavailable reason once stop() began


@dataclasses.dataclass(frozen=True)
class Refused:
    """A comment the model refused alone (the engine isolated it); its neighbours were scored."""

    error_type: str
    reason: str


Outcome = Score | Refused


class ScoringService:
    """Submits comments to the engine and awaits them; see the module docstring for the answers.

    Outcomes come back through the engine's `on_batch` hook (`deliver`, pass it when building the
    engine, then `attach` the engine): one hand-over to the event loop per batch, rather than one
    per comment through each job's concurrent future, which is measurable at 0.4 ms per request.
    """

    def __init__(
        self,
        *,
        deadline_s: float,
        unavailable_retry_after_s: float,
        queue_retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.deadline_s = deadline_s
        self.unavailable_retry_after_s = unavailable_retry_after_s
        self.queue_retry_after_s = queue_retry_after_s
        self._clock = clock

    def attach(self, engine: Any) -> ScoringService:
        self.engine = engine
        return self

    def deliver(self, results: Sequence[tuple[Any, Any]]) -> None:
        """The engine's on_batch hook (a scoring thread): hands a batch's outcomes to the event loop at once."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits any more
            pass

    async def labels(self) -> tuple[str, ...]:
        """The labels of the model version being served, or () while the model has not answered.

        The engine knows them for free from the last batch; only before the first one does asking
        cost a GetModelMetadata call (off the event loop).
        """
        if self.engine.answered_labels:  # the common case: no executor hop, no RPC
            return self.engine.answered_labels
        loop = asyncio.get_running_loop()
        try:
            return tuple(await loop.run_in_executor(None, self.engine.labels))
        except Exception as exc:  # noqa: BLE001 - any failure means "not known now"; /readyz says why
            log.info("model labels unknown: %s", exc)
            return ()

    async def score(self, comments: Sequence[Comment]) -> list[Outcome]:
        deadline = self._clock() + self.deadline_s
        loop = self._loop = asyncio.get_running_loop()
        waits = []
        try:
            for comment in comments:
                waiter = loop.create_future()
                self.engine.submit(comment, deadline=deadline, context=waiter)
                waits.append(waiter)
        except QueueFull:
            raise ApiError(
                429,
                Reason.QUEUE_FULL,
                "the scoring queue is full: the model server is not keeping up; retry after the time in Retry-After",
                retry_after_s=self.queue_retry_after_s,
            ) from None
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock()) + DEADLINE_MARGIN_S):
                # One comment (the common request) needs no gather: one task less per request.
                results = [await waits[0]] if len(waits) == 1 else await asyncio.gather(*waits)
        except TimeoutError:
            raise ApiError(
                504,
                Reason.DEADLINE_EXCEEDED,
                f"no score within the request deadline of {self.deadline_s:g} s",
                retry_after_s=self.unavailable_retry_after_s,
            ) from None
        return [self._outcome(r) for r in results]

    def _outcome(self, result: Any) -> Outcome:
        if isinstance(result, Scored):
            return result.score
        if isinstance(result, Rejected):
            return Refused(result.error_type, result.reason)
        if isinstance(result, Unavailable):
            if result.reason == SHUTTING_DOWN:
                raise ApiError(503, Reason.SHUTTING_DOWN, "the API is shutting down; another replica will answer", retry_after_s=1)
            raise ApiError(
                503,
                Reason.MODEL_UNAVAILABLE,
                f"the model server is unavailable: {result.reason}",
                retry_after_s=self.unavailable_retry_after_s,
            )
        raise ApiError(500, Reason.INTERNAL, f"the scoring engine answered {type(result).__name__}, which this API does not know")


def _resolve(results: Sequence[tuple[Any, Any]]) -> None:
    for job, outcome in results:
        waiter = job.context
        if waiter is not None and not waiter.done():  # done: its request gave up (deadline, disconnect)
            waiter.set_result(outcome)


def refused_error(refused: Refused, *, index: int | None = None, perspective: bool = False) -> ApiError:
    """The answer for a request whose only comment the model refused: 422 with the model's reason."""
    return ApiError(
        422,
        refused.error_type,
        f"the model refused this comment: {refused.reason}",
        perspective_type="INVALID_REQUEST" if perspective else None,
        metadata={} if index is None else {"index": index},
    )
