"""The scoring engine: comments from any number of callers in, micro-batched Predict calls out.

One piece of code serves the Pub/Sub worker and the HTTP API (STYLE.md point 1). Whoever calls it:
- concurrent `submit`s share batches (esp.batcher: bounded by size and time, length-grouped), with
  `batches_in_flight` batches at the model server at once, so many single-comment callers cost
  what one batched caller costs;
- every submitted comment gets exactly one Outcome: Scored; Rejected (its own fault, shown by a
  canary, esp.scoring.score_isolating); or Unavailable (its deadline passed, or shutdown came,
  while the model server could not answer). A comment with no deadline (the worker's) waits out
  any outage: its message keeps its lease, and a nack would spend a delivery attempt;
- an outage (the server unreachable, the model not served, or the canary failing too) is the
  model's, never the comments': the engine opens the `model server` outage in esp.outages (the
  worker stops pulling, /readyz says why), retries in-flight batches with capped backoff, probes
  while nothing else asks, and closes the outage on the first answer;
- a batch that breaks in ESP's own code marks the engine failed (`fatal`), answers the batch's
  callers, and leaves the host to fail its health checks and exit: no thread dies silently.

Results reach the host through `on_batch(results)`, called once per batch from a scoring thread
(the worker publishes one request per batch there), and through each job's future.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esp import outages as causes
from esp.batcher import MicroBatcher
from esp.contracts import Comment
from esp.outages import Outages
from esp.scoring import OUTAGE_ERRORS, Canary, ModelFault, Rejected, Scored, Scorer, score_isolating
from esp.settings.batching import BatchingSettings

log = logging.getLogger(__name__)

__all__ = ["Job", "Outcome", "QueueFull", "Rejected", "Scored", "ScoringEngine", "Unavailable"]


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """No score: the deadline passed (or shutdown came) while the model server could not answer."""

    reason: str


Outcome = Scored | Rejected | Unavailable


class QueueFull(Exception):
    """`submit` when `max_queued` comments already wait for a batch: come back later (HTTP 429)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One submitted comment, with what its caller attached (`context`) and its future (None when
    its outcome reaches the caller only through `on_batch`)."""

    comment: Comment
    context: Any
    deadline: float | None  # time.monotonic() seconds, or None: wait out any outage
    published_at: dt.datetime | None
    future: concurrent.futures.Future | None


_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Latency histogram buckets, seconds; the worker's and the API's latency metrics use the same ones.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# How often jobs with a deadline are swept out of the queue while they cannot be batched.
_EXPIRY_SWEEP_S = 0.05


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, is_down: Callable[[], bool], queued: Callable[[], int]) -> None:
        r = registry
        self.batch_size = Histogram("esp_batch_size", "Comments per Predict batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram(
            "esp_batch_latency_seconds",
            "Time to score one batch, including isolating comments the model refused, excluding outage waits.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter("esp_batch_retries", "Batch attempts that met a model outage and were retried.", registry=r)
        self.model_faults = Counter(
            "esp_model_faults", "Batches that failed while the known-good canary failed too: the model is broken.", registry=r
        )
        self.isolated = Counter(
            "esp_isolated_comments", "Comments the model could not score alone, by error type.", ["error_type"], registry=r
        )
        self.unavailable = Counter(
            "esp_unavailable_comments", "Comments answered Unavailable (deadline or shutdown during an outage).", registry=r
        )
        outage = Gauge("esp_model_outage", "1 while the model server is unavailable or at fault.", registry=r)
        outage.set_function(lambda: 1.0 if is_down() else 0.0)
        depth = Gauge("esp_engine_queued", "Comments waiting for a batch.", registry=r)
        depth.set_function(lambda: float(queued()))


class ScoringEngine:
    """See the module docstring. `start()` returns at once; `stop()` drains within its grace."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        settings: BatchingSettings | None = None,
        max_queued: int | None = None,
        registry: CollectorRegistry | None = None,
        probe: Callable[[], object] | None = None,
        on_batch: Callable[[list[tuple[Job, Outcome]]], None] | None = None,
        outages: Outages | None = None,
        canary: Canary | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scorer = scorer
        self.settings = settings or BatchingSettings()
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.max_queued = max_queued
        self.outages = outages or Outages()
        self.canary = canary or Canary(scorer)
        self._probe = probe
        self._on_batch = on_batch
        self._clock = clock

        s = self.settings
        self._batcher: MicroBatcher[Job] = MicroBatcher(
            max_batch_size=s.max_batch_size,
            max_latency_s=s.max_batch_latency_ms / 1000.0,
            length_grouping=s.length_grouping,
            length=lambda job: len(job.comment.text),
        )
        self._cond = threading.Condition()
        self._with_deadline = 0  # queued jobs that have a deadline (only then is the queue swept)
        self._next_sweep = 0.0
        self._slots = threading.BoundedSemaphore(s.batches_in_flight)
        self._in_flight: set[concurrent.futures.Future] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._batch_ids = itertools.count(1)
        self._dispatcher: threading.Thread | None = None

        self._labels: tuple[str, ...] = ()
        self._state = threading.Lock()
        self._servable = threading.Event()  # set once the model first answered
        self._down_reason: str | None = None  # set while the model does not answer (after it first did)
        # What esp.outages was last told (see _sync_outage): True while the engine holds the model outage open.
        self._outage_reported = False
        self._outage_syncing = threading.Lock()
        self._outage_dirty = False
        self._not_ready_reason = "model not probed yet"
        self._last_activity = clock()
        self._next_probe = 0.0
        self._probe_backoff = s.retry_initial_backoff_s
        self._stopping = threading.Event()
        self._grace_over = threading.Event()
        self.fatal: str | None = None

        self.registry = registry or CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, self.is_down, lambda: len(self._batcher))

    # ------------------------------------------------------------------ the interface

    def start(self) -> ScoringEngine:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.settings.batches_in_flight, thread_name_prefix="esp-score")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="esp-dispatch", daemon=True)
        self._dispatcher.start()
        return self

    def submit(
        self,
        comment: Comment,
        *,
        deadline: float | None = None,
        context: Any = None,
        published_at: dt.datetime | None = None,
    ) -> concurrent.futures.Future:
        """Queues a valid comment; the future's result is its Outcome. Raises QueueFull when the queue is full."""
        future = concurrent.futures.Future()
        self._enqueue([Job(comment, context, deadline, published_at, future)])
        return future

    def submit_all(
        self,
        comments: Sequence[Comment],
        *,
        deadline: float | None = None,
        contexts: Sequence[Any] | None = None,
        futures: bool = True,
    ) -> list[concurrent.futures.Future]:
        """Queues all of `comments` or none of them (QueueFull): a caller that needs every score, an
        HTTP request, would otherwise leave the ones queued before the refusal scored for nobody.

        `futures=False` (for a caller that takes its outcomes from `on_batch`, the HTTP API) makes
        no future per comment, each a lock and a condition, and returns [].
        """
        jobs = [
            Job(comment, context, deadline, None, concurrent.futures.Future() if futures else None)
            for comment, context in zip(comments, contexts or [None] * len(comments), strict=True)
        ]
        return [job.future for job in self._enqueue(jobs) if job.future is not None]

    def _enqueue(self, jobs: list[Job]) -> list[Job]:
        with self._cond:
            # Checked under the lock stop() drains under: a job is either queued before the drain
            # (and answered by it) or sees the flag, never left in a queue nobody reads again.
            stopping = self._stopping.is_set()
            if not stopping:
                if self.max_queued is not None and len(self._batcher) + len(jobs) > self.max_queued:
                    raise QueueFull(f"{len(jobs)} comments do not fit: {len(self._batcher)} of {self.max_queued} places taken")
                now = self._clock()
                for job in jobs:
                    self._batcher.add(job, now)
                self._with_deadline += sum(job.deadline is not None for job in jobs)
                self._cond.notify()
        if stopping:
            self._deliver([(job, Unavailable("shutting down")) for job in jobs])
        return jobs

    @property
    def answered_labels(self) -> tuple[str, ...]:
        """The labels of the model version that answered last, without asking anyone; () before."""
        return self._labels

    def labels(self) -> tuple[str, ...]:
        """The labels of the model version that answered last (from its outputs, so free), or, before
        any answer, what the scorer says its signature declares; () when it cannot say."""
        if self._labels:
            return self._labels
        labels = getattr(self.scorer, "labels", None)
        return tuple(labels()) if callable(labels) else ()

    @property
    def servable(self) -> threading.Event:
        """Set once the model has answered; the worker pulls nothing before."""
        return self._servable

    def is_down(self) -> bool:
        with self._state:
            return self._down_reason is not None

    def not_ready(self) -> str | None:
        """None when the engine can score now; otherwise why not."""
        if self.fatal is not None:
            return f"scoring engine failed: {self.fatal}"
        if self._stopping.is_set():
            return "shutting down"
        with self._state:
            if not self._servable.is_set():
                return f"model not ready: {self._not_ready_reason}"
            if self._down_reason is not None:
                return f"paused: model server unavailable: {self._down_reason}"
        return None

    def alive(self) -> bool:
        """False once a thread of the engine died or a batch broke in ESP's own code."""
        if self.fatal is not None:
            return False
        return self._dispatcher is None or self._dispatcher.is_alive() or self._stopping.is_set()

    def stop(self, grace_s: float) -> None:
        """Stops taking batches; in-flight ones get `grace_s` to finish, then answer Unavailable."""
        deadline = self._clock() + grace_s
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join()
        with self._cond:
            waiting = self._batcher.drain()
            self._with_deadline = 0
        self._deliver([(job, Unavailable("shutting down")) for job in waiting])
        with self._cond:
            in_flight = set(self._in_flight)
        if in_flight:
            log.info("waiting up to %.1fs for %d batches in flight", max(0.0, deadline - self._clock()), len(in_flight))
            concurrent.futures.wait(in_flight, timeout=max(0.0, deadline - self._clock()))
        self._grace_over.set()
        with self._cond:
            in_flight = set(self._in_flight)
        # Past the grace, batches still retrying an outage answer Unavailable at their next check.
        concurrent.futures.wait(in_flight, timeout=5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ model state

    def _model_answered(self) -> None:
        with self._state:
            was_down = self._down_reason is not None
            self._down_reason = None
            self._probe_backoff = self.settings.retry_initial_backoff_s
            first = not self._servable.is_set()
            self._servable.set()
        if was_down:
            self._sync_outage()
        elif first:
            log.info("model answers; scoring")

    def _model_failed(self, reason: str) -> None:
        with self._state:
            if not self._servable.is_set():
                self._not_ready_reason = reason
                return
            self._down_reason = reason
        self._sync_outage()

    def _sync_outage(self) -> None:
        """Brings esp.outages in line with `_down_reason`, whichever thread changed it last.

        Batches in flight fail and succeed concurrently: had each told esp.outages its own edge, a
        success overtaking a failure (between the failure's state change and its `begin`) would end
        nothing and then leave an outage open that no one ends: the worker paused forever while the
        model answers. Here one thread at a time reports the *current* state; a thread that finds
        another reporting leaves it a note, and the reporter reads the state again before it stops.
        """
        self._outage_dirty = True
        while self._outage_dirty:
            if not self._outage_syncing.acquire(blocking=False):
                return  # the thread reporting sees the note after it lets go, and reports again
            try:
                self._outage_dirty = False
                with self._state:
                    down = self._down_reason
                if down is not None and not self._outage_reported:
                    self.outages.begin(causes.MODEL, down)
                    self._outage_reported = True
                elif down is not None:
                    self.outages.update(causes.MODEL, down)
                elif self._outage_reported:
                    self.outages.end(causes.MODEL)
                    self._outage_reported = False
            finally:
                self._outage_syncing.release()

    def _probe_now(self) -> None:
        """Asks the model whether it serves (the host's probe, else the canary)."""
        try:
            if self._probe is not None:
                self._probe()
            else:
                problem = self.canary.failure(fresh=True)
                if problem is not None:
                    raise ModelFault(problem)
        except Exception as exc:  # any failure means "not servable"; the reason goes to /readyz
            reason = str(exc) or type(exc).__name__
            log.warning("model not answering: %s", reason)
            self._model_failed(reason)
            now = self._clock()
            with self._state:
                self._next_probe = now + self._probe_backoff
                self._probe_backoff = min(self._probe_backoff * 2, self.settings.retry_max_backoff_s)
            return
        self._last_activity = self._clock()
        self._model_answered()

    # ------------------------------------------------------------------ dispatching

    def _dispatch_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                now = self._clock()
                self._deliver(self._take_expired(now))
                if self._needs_probe(now):
                    self._probe_now()
                    continue
                if not self._servable.is_set() or self.is_down():
                    # Batches in flight retry by themselves; new ones wait for a probe to pass.
                    self._wait_out_outage(now)
                    continue
                if not self._slots.acquire(timeout=0.1):
                    continue
                batch = self._next_batch()
                if batch is None:
                    self._slots.release()
                    continue
                self._launch(batch)
        except BaseException as exc:  # a bug in ESP: say so loudly rather than stop silently
            self._fail(f"dispatcher thread died: {type(exc).__name__}: {exc}")
            raise

    def _wait_out_outage(self, now: float) -> None:
        """Sleeps while the model is down: until a batch in flight finishes (its retry may have
        closed the outage), a probe is due, a sweep of deadlines is due, or stop() is called."""
        with self._cond:
            if self._stopping.is_set():
                return
            # With a batch in flight no probe runs (its retries are the probe): wake when it ends.
            wait = 0.5 if self._in_flight else min(0.5, max(0.0, self._next_probe - now))
            if self._with_deadline:
                wait = min(wait, max(0.0, self._next_sweep - now), _EXPIRY_SWEEP_S)
            if wait > 0:
                self._cond.wait(wait)

    def _needs_probe(self, now: float) -> bool:
        with self._cond:
            idle = not self._in_flight and not len(self._batcher)
        if not self._servable.is_set() or self.is_down():
            with self._cond:
                busy = bool(self._in_flight)
            return not busy and now >= self._next_probe
        return idle and now - self._last_activity >= self.settings.idle_probe_interval_s

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            now = self._clock()
            batch = self._batcher.pop(now)
            if batch is None:
                self._cond.wait(self._wait_s(now))
                batch = self._batcher.pop(self._clock())
            if batch is not None:
                self._with_deadline -= sum(job.deadline is not None for job in batch)
        return batch

    def _wait_s(self, now: float) -> float:
        """How long the dispatcher may sleep: until a batch is due, a sweep, or an idle probe."""
        wait = 0.5
        due = self._batcher.due_at()
        if due is not None:
            wait = min(wait, due - now)
        if self._with_deadline:
            wait = min(wait, _EXPIRY_SWEEP_S)
        if not len(self._batcher) and not self._in_flight:
            wait = min(wait, self._last_activity + self.settings.idle_probe_interval_s - now)
        return max(0.0, wait)

    def _take_expired(self, now: float) -> list[tuple[Job, Outcome]]:
        with self._cond:
            if not self._with_deadline or now < self._next_sweep:
                return []
            self._next_sweep = now + _EXPIRY_SWEEP_S
            expired = self._batcher.remove_where(lambda job: job.deadline is not None and job.deadline <= now)
            self._with_deadline -= len(expired)
        return [(job, self._unavailable()) for job in expired]

    def _unavailable(self) -> Unavailable:
        with self._state:
            down = self._down_reason
            ready = self._servable.is_set()
            not_ready = self._not_ready_reason
        if down is not None:
            return Unavailable(f"model server unavailable: {down}")
        if not ready:
            return Unavailable(f"model not ready: {not_ready}")
        return Unavailable("deadline passed before the model answered")

    def _launch(self, batch: list[Job]) -> None:
        if self._pool is None:
            raise RuntimeError("the engine was not started")
        future = self._pool.submit(self._run_batch, batch)
        with self._cond:
            self._in_flight.add(future)
        future.add_done_callback(self._batch_done)

    def _batch_done(self, future: concurrent.futures.Future) -> None:
        with self._cond:
            self._in_flight.discard(future)
            self._cond.notify_all()
        self._last_activity = self._clock()
        self._slots.release()

    # ------------------------------------------------------------------ scoring one batch

    def _run_batch(self, jobs: list[Job]) -> None:
        self._last_activity = self._clock()
        try:
            self._score(jobs)
        except BaseException as exc:  # a bug in ESP's own code: answer, then fail health
            log.exception("a scoring thread failed in ESP's own code")
            self._fail(f"scoring thread failed: {type(exc).__name__}: {exc}")
            self._deliver([(job, Unavailable(f"internal error: {type(exc).__name__}")) for job in jobs if job.future is None or not job.future.done()])

    def _score(self, jobs: list[Job]) -> None:
        batch_id = next(self._batch_ids)
        backoff = self.settings.retry_initial_backoff_s
        while True:
            now = self._clock()
            expired = [job for job in jobs if job.deadline is not None and job.deadline <= now]
            if expired:
                self._deliver([(job, self._unavailable()) for job in expired])
                jobs = [job for job in jobs if not (job.deadline is not None and job.deadline <= now)]
                if not jobs:
                    return
            if self._grace_over.is_set():
                self._deliver([(job, Unavailable("shutting down")) for job in jobs])
                return
            started = self._clock()
            try:
                outcomes = score_isolating(
                    self.scorer,
                    [job.comment for job in jobs],
                    canary=self.canary,
                    published_at=[job.published_at for job in jobs],
                )
            except (*OUTAGE_ERRORS, ModelFault) as exc:
                if isinstance(exc, ModelFault):
                    self.metrics.model_faults.inc()
                    log.error("batch %d: model fault, not the comments': pausing: %s", batch_id, exc, extra={"batch_id": batch_id})
                self._model_failed(f"{type(exc).__name__}: {exc}")
                self.metrics.retries.inc()
                wait = backoff
                deadlines = [job.deadline for job in jobs if job.deadline is not None]
                if deadlines:
                    wait = min(wait, max(0.0, min(deadlines) - self._clock()))
                self._grace_over.wait(wait)
                backoff = min(backoff * 2, self.settings.retry_max_backoff_s)
                continue
            self._model_answered()
            elapsed = self._clock() - started
            self.metrics.batch_size.observe(len(jobs))
            self.metrics.batch_latency.observe(elapsed)
            isolated = [o for o in outcomes if isinstance(o, Rejected)]
            for outcome in isolated:
                self.metrics.isolated.labels(outcome.error_type).inc()
            first = next((o.score for o in outcomes if isinstance(o, Scored)), None)
            version = first.model_version if first is not None else None
            if first is not None:
                self._labels = tuple(first.probabilities)
            log.debug(
                "batch %d: %d comments in %.1f ms, %d isolated", batch_id, len(jobs), elapsed * 1000, len(isolated),
                extra={"batch_id": batch_id, "model_version": version},
            )
            self._deliver(list(zip(jobs, outcomes)))
            return

    def _deliver(self, results: Sequence[tuple[Job, Outcome]]) -> None:
        if not results:
            return
        self.metrics.unavailable.inc(sum(isinstance(o, Unavailable) for _, o in results))
        try:
            if self._on_batch is not None:
                self._on_batch(list(results))
        finally:
            for job, outcome in results:
                if job.future is not None and not job.future.done():
                    job.future.set_result(outcome)

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.critical("scoring engine failed, health checks fail from now on: %s", reason)
