"""Scores a request's comments through the shared engine, from asyncio, within the request's deadline.

Every comment of every concurrent request goes to the one `esp.engine.ScoringEngine`, which
micro-batches them (length-grouped) into Predict calls: many single-comment callers cost what one
batched caller costs. This module only turns the engine's outcomes into answers:

- the request's comments do not all fit in the engine's queue -> 429 queue_full, Retry-After;
  a request is queued whole or not at all, so a refused one leaves nothing to score for nobody;
- no score by the deadline, whatever the model server does (down, frozen, slow) or the engine
  is busy with                                                -> 503 model_unavailable,
  Retry-After. The service keeps the deadline itself: a frozen model server holds the engine's
  threads for a whole RPC timeout, and no request waits that out;
- the model refused one comment (`Rejected`)                 -> that comment's own error, its
  neighbours scored.

The deadline covers all the model work of a request: asking the model for its labels (which only
happens before its first batch; one lookup at a time, shared by every request waiting for it) and
scoring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from api.errors import ApiError, Reason
from esp.contracts import Comment, Score
from esp.engine import QueueFull, Rejected, Scored, Unavailable

log = logging.getLogger(__name__)

# How long past its deadline a request still waits for the engine's own answer (its sweep of
# expired comments runs every 50 ms) before answering 503 itself.
DEADLINE_MARGIN_S = 0.05
SHUTTING_DOWN = "shutting down"  # the engine's Unavailable reason once stop() began


@dataclasses.dataclass(frozen=True)
class Refused:
    """A comment the model refused alone (the engine isolated it); its neighbours were scored."""

    error_type: str
    reason: str


Outcome = Score | Refused


# The outcome the deadline sweep gives a waiter that had none in time.
_DEADLINE_PASSED = object()
# The sweep runs at most this often: entries expire in bulk, not one timer per request.
_SWEEP_EVERY_S = 0.025


class ScoringService:
    """Submits comments to the engine and awaits them; see the module docstring for the answers.

    Outcomes come back through the engine's `on_batch` hook (`deliver`, pass it when building the
    engine, then `attach` the engine): one hand-over to the event loop per batch, rather than one
    per comment through each job's concurrent future, which is measurable at 0.4 ms per request.
    The engine makes no concurrent future for these comments at all (`submit_all(futures=False)`).

    Deadlines are kept by one sweep for all requests (`_sweep_deadlines`), not a timer per request:
    a heap push per request costs a fraction of what `asyncio.timeout` does (a context manager and
    a timer handle), which py-spy found in about a tenth of the event loop's samples at full load.
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
        self._labels_lookup: asyncio.Future | None = None
        # (expires at, seq, waiters) of the requests waiting for outcomes. An answered request
        # empties its list and its entry stays until it expires (cheaper than taking it out), so
        # the heap holds about requests/s x deadline entries of about 170 bytes: 600 for a pod at
        # 300 requests/s with the default 2 s, 15 MB at the longest deadline allowed (300 s).
        self._deadlines: list[tuple[float, int, list[asyncio.Future]]] = []
        self._deadline_seq = itertools.count()
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0

    def deadline(self) -> float:
        """The deadline of a request starting now, on the service's clock."""
        return self._clock() + self.deadline_s

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

    async def labels(self, deadline: float | None = None) -> tuple[str, ...]:
        """The labels of the model version being served, or () while the model has not answered
        (or did not by `deadline`).

        The engine knows them for free from the last batch; only before the first one does asking
        cost a GetModelMetadata call (off the event loop). One such call at a time, shared by every
        request that waits for it: a frozen model server holds one thread, not one per request.
        """
        if self.engine.answered_labels:  # the common case: no executor hop, no RPC
            return self.engine.answered_labels
        deadline = self.deadline() if deadline is None else deadline
        lookup = self._labels_lookup
        if lookup is None or lookup.done():
            lookup = self._labels_lookup = asyncio.get_running_loop().run_in_executor(None, self.engine.labels)
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                return tuple(await asyncio.shield(lookup))
        except TimeoutError:
            log.info("model labels unknown: the model server did not answer within the request deadline")
            return ()
        except Exception as exc:  # noqa: BLE001 - any failure means "not known now"; /readyz says why
            log.info("model labels unknown: %s", exc)
            return ()

    async def score(self, comments: Sequence[Comment], *, deadline: float | None = None) -> list[Outcome]:
        """Each comment's outcome, or ApiError 429/503 for the whole request; see the module docstring."""
        deadline = self.deadline() if deadline is None else deadline
        loop = self._loop = asyncio.get_running_loop()
        if self.engine.max_queued is not None and len(comments) > self.engine.max_queued:
            raise ApiError(
                413,
                Reason.TOO_MANY_COMMENTS,
                f"this request has {len(comments)} comments to score, more than the scoring queue holds "
                f"({self.engine.max_queued}, ESP_API_MAX_QUEUED)",
            )
        waits = [loop.create_future() for _ in comments]
        try:
            self.engine.submit_all(comments, deadline=deadline, contexts=waits, futures=False)
        except QueueFull:
            raise ApiError(
                429,
                Reason.QUEUE_FULL,
                "the scoring queue is full: the model server is not keeping up; retry after the time in Retry-After",
                retry_after_s=self.queue_retry_after_s,
            ) from None
        self._expire_at(deadline + DEADLINE_MARGIN_S, waits, loop)
        # One comment (the common request) needs no gather: one task less per request.
        results = [await waits[0]] if len(waits) == 1 else await asyncio.gather(*waits)
        waits.clear()  # the sweep's entry holds this list until the deadline: let the outcomes go now
        if any(r is _DEADLINE_PASSED for r in results):
            # The engine could not answer in time (its threads wait on the model server): answer for it.
            reason = self.engine.not_ready() or "no answer from the model server"
            raise self._unavailable(f"no score within the request deadline of {self.deadline_s:g} s: {reason}")
        return [self._outcome(r) for r in results]

    def _expire_at(self, when: float, waits: list[asyncio.Future], loop: asyncio.AbstractEventLoop) -> None:
        """Resolves `waits` still without an outcome at `when` (service clock) with _DEADLINE_PASSED."""
        heapq.heappush(self._deadlines, (when, next(self._deadline_seq), waits))
        if self._sweep is None or when < self._sweep_at:
            self._schedule_sweep(when, loop)

    def _schedule_sweep(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = loop.call_later(max(0.0, when - self._clock()), self._sweep_deadlines, loop)

    def _sweep_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        now = self._clock()
        heap = self._deadlines
        swept = False
        while heap and heap[0][0] <= now:
            swept = True
            for waiter in heapq.heappop(heap)[2]:
                if not waiter.done():
                    waiter.set_result(_DEADLINE_PASSED)
        if heap:
            self._schedule_sweep(max(heap[0][0], now + _SWEEP_EVERY_S) if swept else heap[0][0], loop)

    def _unavailable(self, reason: str) -> ApiError:
        if reason.endswith(SHUTTING_DOWN):
            return ApiError(503, Reason.SHUTTING_DOWN, "the API is shutting down; another replica will answer", retry_after_s=1)
        return ApiError(503, Reason.MODEL_UNAVAILABLE, reason, retry_after_s=self.unavailable_retry_after_s)

    def _outcome(self, result: Any) -> Outcome:
        if isinstance(result, Scored):
            return result.score
        if isinstance(result, Rejected):
            return Refused(result.error_type, result.reason)
        if isinstance(result, Unavailable):
            raise self._unavailable(SHUTTING_DOWN if result.reason == SHUTTING_DOWN else f"the model server is unavailable: {result.reason}")
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
