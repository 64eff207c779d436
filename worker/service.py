"""The scoring worker: pulls comments, validates, scores through the shared engine, publishes, acks.

Threads, each with one job, every one supervised (a thread that dies fails /healthz and makes
`run()` exit non-zero, so Kubernetes restarts the pod; nothing keeps looking healthy while idle):
- the puller: unary Pull in batches (10x the streaming-pull callback's rate on the emulator, see
  DESIGN.md), only while the ledger has room and no outage is open. It validates each message on
  its own: any failure, expected (InvalidComment) or not, dead-letters that one message with its
  stage, type and reason, and its neighbours go on to the engine;
- the scoring engine (esp.engine, shared with the HTTP API): micro-batches, canary-checked isolation
  of comments the model cannot score, and model outages; it hands each finished batch to
  `_on_batch`, which publishes all its scores in one Publish request and acks them;
- the dead-letter publisher: sends dead letters in batched requests, acks their messages once
  Pub/Sub confirmed them;
- the settler: sends acks and nacks in batches; the lease keeper: extends the leases of everything
  held, recording an extension only once Pub/Sub confirmed it (a failed one is retried before the
  lease runs out). Separate threads, so acks, nacks and extensions never wait on one another.

Faults are told apart (docs/worker.md, "Faults"): a message's own fault is dead-lettered with its
reason; an outage of the model server or of a topic pauses pulling and holds every lease, because
each nack, like each expired lease, spends one of the message's delivery attempts. Held messages
are released only at the maximum lease duration or at shutdown, one attempt each. Settling goes
through the Ledger, which lets a message be settled exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from esp import outages as causes
from esp.contracts import Comment, DeadLetter, ErrorType, InvalidComment, Stage, dead_letter_for, parse_comment
from esp.engine import Job, Outcome, Rejected, Scored, ScoringEngine
from esp.errors import ConfigError
from esp.outages import Outages
from esp.pubsub import check_reachable, publisher_client, subscriber_client, translate_errors
from esp.scoring import Scorer
from esp.settings import BatchingSettings, CommentSettings, PubSubSettings
from esp.settings.worker import WorkerSettings
from worker import metrics as m
from worker.health import HealthServer
from worker.leases import Ledger
from worker.publisher import GAVE_UP, PUBLISHED, TopicPublisher

log = logging.getLogger(__name__)

# Acknowledge/ModifyAckDeadline requests carry at most this many ack ids (Pub/Sub caps a request at
# 512 KB; real ack ids are up to ~200 bytes).
SETTLE_CHUNK = 1000
# Dead letters sent in one Publish request at most (TopicPublisher also bounds the bytes).
DEAD_LETTER_BATCH = 500
# After the shutdown grace, how long the final acks and nacks may take. The worker exits within
# shutdown_grace_s + SHUTDOWN_FLUSH_S; the pod's terminationGracePeriodSeconds must exceed that.
SHUTDOWN_FLUSH_S = 8.0
# Acks and nacks that fail are retried this many times (with backoff) before they are given up.
SETTLE_ATTEMPTS = 3
UTC = dt.timezone.utc


@dataclasses.dataclass(eq=False)
class Held:
    """A pulled message the worker holds until it is settled: what acking and dead-lettering need."""

    ack_id: str
    message: Any  # the PubsubMessage protobuf: original bytes and attributes, for a dead letter
    delivery_attempt: int
    published_at: dt.datetime | None = None


def read_comment(message: Any, *, max_body_bytes: int) -> Comment:
    """A pulled message's comment, or InvalidComment with the reason; never any other exception.

    Whatever a body makes ESP raise is that one message's problem: it is dead-lettered as an
    internal error with the exception named, and its neighbours go on (tests/test_intake_fuzz.py).
    """
    try:
        return parse_comment(bytes(message.data), max_body_bytes=max_body_bytes)
    except InvalidComment:
        raise
    except Exception as exc:
        log.exception("unexpected error while reading message %s", getattr(message, "message_id", "?"))
        raise InvalidComment(ErrorType.INTERNAL_ERROR, f"{type(exc).__name__}: {str(exc)[:300]}") from None


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One scoring worker. `start()` returns once its threads run; `stop()` drains and returns.

    `probe` is called before pulling starts and while idle (it must raise while the model is not
    servable); the CLI passes the scorer's model check. `clock` is monotonic seconds, injectable.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        pubsub: PubSubSettings,
        settings: WorkerSettings,
        batching: BatchingSettings | None = None,
        comments: CommentSettings | None = None,
        probe: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: m.WorkerMetrics | None = None,
    ) -> None:
        self.scorer = scorer
        self.pubsub = pubsub
        self.settings = settings
        self.batching = batching or BatchingSettings()
        self.comments = comments or CommentSettings()
        if settings.max_outstanding_messages < self.batching.max_batch_size:
            raise ConfigError("max_outstanding_messages must be at least max_batch_size, or no batch could ever fill")
        self._clock = clock
        self.metrics = metrics or m.WorkerMetrics()
        self.worker_id = settings.worker_id or default_worker_id()
        self._sub_path = pubsub.subscription_path(pubsub.subscription)

        self._ledger = Ledger(
            max_messages=settings.max_outstanding_messages,
            max_bytes=settings.max_outstanding_bytes,
            extension_s=settings.lease_extension_s,
            margin_s=settings.lease_margin_s,
            max_lease_duration_s=settings.max_lease_duration_s,
        )
        self.outages = Outages(on_change=self._outage_changed, on_resolved=self._outage_resolved, clock=clock)
        self.engine = ScoringEngine(
            scorer,
            settings=self.batching,
            registry=self.metrics.registry,
            probe=probe,
            on_batch=self._on_batch,
            outages=self.outages,
            clock=clock,
        )

        self._stop = threading.Event()  # stop pulling
        self._grace_deadline = float("inf")  # past it, retries give up (shutdown)
        self._stop_requested = threading.Event()  # set by signal handlers (Event.set is signal-safe)
        self._fatal: str | None = None
        self._pulling = False
        self._pull_error: str | None = None
        self._state_lock = threading.Lock()

        self._settle_cond = threading.Condition()
        self._acks: list[str] = []
        self._nacks: list[str] = []
        self._settle_done = False
        self._dead_letter_cond = threading.Condition()
        self._dead_letter_queue: collections.deque[tuple[Held, DeadLetter]] = collections.deque()
        self._dead_letters_done = False

        self._outcome = {o: self.metrics.messages.labels(o) for o in m.OUTCOMES}
        self.metrics.ready.set_function(lambda: 1.0 if self.ready() else 0.0)
        self.metrics.alive.set_function(lambda: 1.0 if self.alive() else 0.0)
        self._threads: list[threading.Thread] = []
        self._publisher: Any = None
        self._subscriber: Any = None
        self._scores_out: TopicPublisher | None = None
        self.health: HealthServer | None = None
        self.ack_deadline_s = pubsub.ack_deadline_s
        self.max_delivery_attempts: int | None = None
        self._started_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, serve_http: bool = True) -> Worker:
        """Opens the clients, starts the HTTP endpoints and the threads; returns without waiting for the model."""
        self._started_at = self._clock()
        if serve_http:
            self.health = HealthServer(
                self.settings.metrics_host,
                self.settings.metrics_port,
                registry=self.metrics.registry,
                not_ready=self.not_ready,
                not_alive=self.not_alive,
            ).start()
        try:
            check_reachable(self.pubsub)
            self._subscriber = subscriber_client(self.pubsub)
            self._read_subscription()
            self._publisher = publisher_client(self.pubsub)
        except BaseException:
            if self._subscriber is not None:
                self._subscriber.close()
            if self.health is not None:
                self.health.stop()
            raise
        with warnings.catch_warnings():
            # The GAPIC publish (one request, many messages) is shadowed on PublisherClient by the
            # per-message publish(); `.api` reaches it and is kept "for backward compatibility".
            warnings.simplefilter("ignore", DeprecationWarning)
            publish_request = self._publisher.api.publish
        self._scores_out = self._topic_publisher(publish_request, self.pubsub.scores_topic, causes.SCORES_TOPIC)
        dead_letters_out = self._topic_publisher(publish_request, self.pubsub.dead_letter_topic, causes.DEAD_LETTER_TOPIC)
        self.engine.start()
        for name, target in (
            ("esp-settle", self._settle_loop),
            ("esp-lease", self._lease_loop),
            ("esp-dead-letter", lambda: self._dead_letter_loop(dead_letters_out)),
            ("esp-pull", self._pull_loop),
        ):
            thread = threading.Thread(target=self._supervised(name, target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _topic_publisher(self, publish_request: Callable[..., Any], topic: str, cause: str) -> TopicPublisher:
        retries = self.metrics.publish_retries.labels(topic)
        return TopicPublisher(
            publish_request,
            self.pubsub.topic_path(topic),
            cause=cause,
            outages=self.outages,
            timeout_s=self.pubsub.pubsub_timeout_s,
            initial_backoff_s=self.batching.retry_initial_backoff_s,
            max_backoff_s=self.batching.retry_max_backoff_s,
            give_up=self._grace_is_over,
            on_retry=retries.inc,
        )

    def _supervised(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a bug in ESP: the process must say so, not idle on
                log.critical("worker thread %s died: %s: %s", name, type(exc).__name__, exc, exc_info=True)
                self._fail(f"thread {name} died: {type(exc).__name__}: {exc}")

        return run

    def _fail(self, reason: str) -> None:
        with self._state_lock:
            if self._fatal is None:
                self._fatal = reason
        self._stop_requested.set()

    def _read_subscription(self) -> None:
        """Reads the ack deadline and dead-letter policy from the subscription itself, the source of truth."""
        with translate_errors(self.pubsub, f"reading subscription {self.pubsub.subscription}"):
            sub = self._subscriber.get_subscription(
                request={"subscription": self._sub_path}, timeout=self.pubsub.pubsub_timeout_s
            )
        self.ack_deadline_s = sub.ack_deadline_seconds or self.pubsub.ack_deadline_s
        if sub.dead_letter_policy.dead_letter_topic:
            self.max_delivery_attempts = sub.dead_letter_policy.max_delivery_attempts or 5
        else:
            log.warning(
                "subscription %s has no dead-letter policy: a comment the model rejects is redelivered forever "
                "(run 'esp pubsub init --update')",
                self._sub_path,
            )

    def request_stop(self) -> None:
        """Signal-handler safe: only records the request; `run()` does the shutdown."""
        self._stop_requested.set()

    def run(self) -> int:
        """Starts, serves until SIGTERM/SIGINT or a fatal fault, drains; returns the exit code."""
        self.start()
        while not self._stop_requested.wait(0.2):
            if self.engine.fatal is not None:
                self._fail(self.engine.fatal)
        if self._fatal is not None:
            log.critical("worker cannot go on, exiting non-zero after a best-effort drain: %s", self._fatal)
        else:
            log.info("stop requested: draining (grace %.0fs)", self.settings.shutdown_grace_s)
        self.stop()
        return 0 if self._fatal is None else 1

    def stop(self) -> None:
        """Stops pulling, lets in-flight work finish within the grace period, nacks the rest, flushes.

        Returns within shutdown_grace_s + SHUTDOWN_FLUSH_S.
        """
        started = self._clock()
        self._grace_deadline = started + self.settings.shutdown_grace_s
        self._stop.set()
        for thread in self._threads:
            if thread.name == "esp-pull":
                thread.join(timeout=self.settings.shutdown_grace_s)
        # In-flight batches finish (publishing included) or answer Unavailable, which nacks.
        self.engine.stop(grace_s=max(0.0, self._grace_deadline - self._clock()))
        with self._dead_letter_cond:
            self._dead_letters_done = True
            self._dead_letter_cond.notify_all()
        self._join("esp-dead-letter", max(0.0, self._grace_deadline - self._clock()) + 1.0)
        left = self._ledger.all_held()
        if left:
            log.info("nacking %d comments not finished within the grace period", len(left))
        self._nack(left, m.NACKED_SHUTDOWN)
        with self._settle_cond:
            self._settle_done = True
            self._settle_cond.notify_all()
        flush_deadline = max(self._grace_deadline, self._clock()) + SHUTDOWN_FLUSH_S
        self._join("esp-settle", max(0.0, flush_deadline - self._clock()))
        self._join("esp-lease", 1.0)
        if self._publisher is not None:
            self._publisher.stop()
        if self._subscriber is not None:
            self._subscriber.close()
        if self.health is not None:
            self.health.stop()
        log.info("worker stopped after %.1fs", self._clock() - started)

    def _join(self, name: str, timeout_s: float) -> None:
        for thread in self._threads:
            if thread.name == name:
                thread.join(timeout=timeout_s)

    def _grace_is_over(self) -> bool:
        return self._clock() >= self._grace_deadline

    # ------------------------------------------------------------------ state

    def not_alive(self) -> str | None:
        """None while every thread runs; otherwise what died (the body of a 503 from /healthz)."""
        if self._fatal is not None:
            return self._fatal
        if self.engine.fatal is not None:
            return self.engine.fatal
        if self._stop.is_set():
            return None
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead:
            return f"worker threads stopped: {', '.join(dead)}"
        if not self.engine.alive():
            return "scoring engine stopped"
        return None

    def alive(self) -> bool:
        return self.not_alive() is None

    def not_ready(self) -> str | None:
        """None when ready to score; otherwise why not (the body of a 503 from /readyz)."""
        dead = self.not_alive()
        if dead is not None:
            return f"failed: {dead}"
        if self._stop.is_set():
            return "shutting down"
        engine = self.engine.not_ready()
        if engine is not None:
            return engine
        paused = self.outages.describe()
        if paused is not None:
            return paused
        with self._state_lock:
            if self._pull_error:
                return f"cannot pull: {self._pull_error}"
            if not self._pulling:
                return "not pulling yet"
        return None

    def ready(self) -> bool:
        return self.not_ready() is None

    def _outage_changed(self, cause: str, is_open: bool) -> None:
        self.metrics.paused.labels(cause).set(1 if is_open else 0)

    def _outage_resolved(self, cause: str, seconds: float) -> None:
        self.metrics.paused_seconds.labels(cause).inc(seconds)

    # ------------------------------------------------------------------ pulling

    def _pull_loop(self) -> None:
        from google.api_core import exceptions as gexc

        # Pulling before the model answers would only hold messages.
        while not self.engine.servable.wait(0.2):
            if self._stop.is_set():
                return
        with self._state_lock:
            self._pulling = True
        log.info(
            "pulling from %s (ack deadline %ss, max %d attempts) in %.2fs since start",
            self._sub_path,
            self.ack_deadline_s,
            self.max_delivery_attempts or 0,
            self._clock() - self._started_at,
        )
        request: dict[str, Any] = {"subscription": self._sub_path, "max_messages": 0}
        pull_failing_since = 0.0
        while not self._stop.is_set():
            # An open outage: messages not yet pulled spend no delivery attempt, so leave them there.
            if self.outages.paused():
                self.outages.wait_until_clear(0.5)
                continue
            room = self._ledger.wait_for_room(0.5)
            if room == 0 or self._stop.is_set():
                continue
            request["max_messages"] = min(room, self.settings.pull_max_messages)
            try:
                response = self._subscriber.pull(request=request, timeout=self.settings.pull_timeout_s, retry=None)
            except gexc.DeadlineExceeded:
                continue  # an idle subscription: nothing arrived within the pull's deadline
            except gexc.GoogleAPICallError as exc:
                with self._state_lock:
                    first = self._pull_error is None
                    self._pull_error = f"{type(exc).__name__}: {exc.message}"
                log.warning("pull from %s failed: %s", self._sub_path, self._pull_error)
                if first:
                    # Shown as a pause like the others, but not one of `outages`: a paused worker
                    # stops pulling, and this one must keep trying the pull to see it answer again.
                    pull_failing_since = self._clock()
                    self._outage_changed(causes.PUBSUB, True)
                self._stop.wait(1.0)
                continue
            if self._pull_error is not None:
                with self._state_lock:
                    self._pull_error = None
                log.warning("pull from %s answers again", self._sub_path)
                self._outage_changed(causes.PUBSUB, False)
                self._outage_resolved(causes.PUBSUB, self._clock() - pull_failing_since)
            received = type(response).pb(response).received_messages
            if received:
                self._take(received)

    def _take(self, received: Sequence[Any]) -> None:
        if self._stop.is_set():
            # Shutdown began while this pull was on the wire: hand these back at once.
            self._send_settle([rm.ack_id for rm in received], 0)
            return
        # The whole message counts (attributes and ordering key too), not just its body.
        self._ledger.hold_many([(rm.ack_id, rm.message.ByteSize()) for rm in received], self._clock(), self.ack_deadline_s)
        self.metrics.pulled.inc(len(received))
        self._update_held_gauges()
        max_body = self.comments.max_body_bytes
        for rm in received:
            held = Held(rm.ack_id, rm.message, rm.delivery_attempt)
            try:
                comment = read_comment(rm.message, max_body_bytes=max_body)
            except InvalidComment as exc:
                log.info("dead-lettering message %s: %s: %s", rm.message.message_id, exc.error_type, exc.reason)
                self._dead_letter(held, Stage.VALIDATE, exc.error_type, exc.reason)
                continue
            try:
                held.published_at = rm.message.publish_time.ToDatetime(tzinfo=UTC)
            except (ValueError, OverflowError):  # set by Pub/Sub, but no timestamp may stop a thread
                held.published_at = None
            self.engine.submit(comment, context=held, published_at=held.published_at)

    # ------------------------------------------------------------------ results of a batch

    def _on_batch(self, results: list[tuple[Job, Outcome]]) -> None:
        """Called by the engine once per batch: one Publish for all its scores, then the acks."""
        scored: list[tuple[Held, bytes, dict[str, str]]] = []
        for job, outcome in results:
            held: Held = job.context
            try:
                if isinstance(outcome, Scored):
                    score = outcome.score
                    scored.append((held, score.to_json_bytes(), score.attributes()))
                elif isinstance(outcome, Rejected):
                    self._rejected(held, job, outcome)
                else:  # Unavailable: only at shutdown, since the worker's comments have no deadline
                    self._nack([held.ack_id], m.NACKED_SHUTDOWN)
            except Exception as exc:  # e.g. a score that cannot be encoded: this message alone is set aside
                log.exception("dead-lettering comment %r: unexpected error while handling its result", job.comment.id)
                self._dead_letter(held, Stage.PUBLISH, ErrorType.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        if scored:
            self._publish_scores(scored)

    def _rejected(self, held: Held, job: Job, outcome: Rejected) -> None:
        last = self.max_delivery_attempts is not None and held.delivery_attempt >= self.max_delivery_attempts
        if last:
            log.warning(
                "comment %r failed alone on its last attempt (%d): dead-lettering it: %s: %s",
                job.comment.id, held.delivery_attempt, outcome.error_type, outcome.reason,
            )
            self._dead_letter(held, Stage.SCORE, outcome.error_type, outcome.reason)
        else:
            log.warning(
                "comment %r failed alone (attempt %d of %s); nacking it for redelivery: %s: %s",
                job.comment.id, held.delivery_attempt, self.max_delivery_attempts, outcome.error_type, outcome.reason,
            )
            self._nack([held.ack_id], m.NACKED_REJECTED)

    def _publish_scores(self, scored: list[tuple[Held, bytes, dict[str, str]]]) -> None:
        """One Publish request per batch (raw protobufs), then the acks: the call's return is the confirmation.

        The client library's per-message `publish()` cost 32 us of CPU per message here (a proto-plus
        message, a future and a lock each); one request per batch costs 10 us and needs no callback.
        """
        if self._scores_out is None:
            raise RuntimeError("the worker was not started")
        results = self._scores_out.publish([(data, attributes) for _, data, attributes in scored])
        acked = [held for (held, _, _), result in zip(scored, results) if result is PUBLISHED]
        settled = set(self._ack_many([held.ack_id for held in acked], m.SCORED))
        now = dt.datetime.now(UTC)
        observe = self.metrics.end_to_end_latency.observe
        for held in acked:
            if held.ack_id in settled and held.published_at is not None:
                observe((now - held.published_at).total_seconds())
        for (held, _, _), result in zip(scored, results):
            if result is GAVE_UP:
                self._nack([held.ack_id], m.NACKED_SHUTDOWN)
            elif isinstance(result, str):
                self._dead_letter(held, Stage.PUBLISH, ErrorType.SCORE_PUBLISH_REFUSED, result)

    # ------------------------------------------------------------------ dead letters

    def _dead_letter(self, held: Held, stage: str, error_type: str, reason: str) -> None:
        msg = held.message
        try:
            letter = dead_letter_for(
                bytes(msg.data),
                dict(msg.attributes),
                stage=stage,
                error_type=error_type,
                reason=reason,
                worker=self.worker_id,
                delivery_attempt=held.delivery_attempt or None,
                source_message_id=msg.message_id,
                source_subscription=self._sub_path,
                ordering_key=msg.ordering_key,
            )
        except Exception:  # cannot even describe it: hand it back; Pub/Sub's policy is the last net
            log.exception("cannot build a dead letter for message %s; nacking it", msg.message_id)
            self._nack([held.ack_id], m.NACKED_PUBLISH_FAILED)
            return
        with self._dead_letter_cond:
            self._dead_letter_queue.append((held, letter))
            self._dead_letter_cond.notify()

    def _dead_letter_loop(self, out: TopicPublisher) -> None:
        while True:
            with self._dead_letter_cond:
                self._dead_letter_cond.wait_for(lambda: self._dead_letter_queue or self._dead_letters_done)
                if not self._dead_letter_queue:
                    return
                batch = [self._dead_letter_queue.popleft() for _ in range(min(DEAD_LETTER_BATCH, len(self._dead_letter_queue)))]
            # to_message() always fits Pub/Sub: the body whole when it can, else cut with its digest.
            results = out.publish([letter.to_message() for _, letter in batch])
            for (held, letter), result in zip(batch, results):
                if result is PUBLISHED:
                    if self._ack(held.ack_id, m.DEAD_LETTERED):
                        self.metrics.dead_letters.labels(letter.error_type).inc()
                elif result is GAVE_UP:
                    self._nack([held.ack_id], m.NACKED_SHUTDOWN)
                else:
                    log.error("Pub/Sub refused the dead letter of message %s even alone; nacking it: %s",
                              held.message.message_id, result)
                    self._nack([held.ack_id], m.NACKED_PUBLISH_FAILED)

    # ------------------------------------------------------------------ settling and leases

    def _ack(self, ack_id: str, outcome: str) -> bool:
        return bool(self._ack_many([ack_id], outcome))

    def _ack_many(self, ack_ids: list[str], outcome: str) -> list[str]:
        settled = self._ledger.settle_many(ack_ids)
        if settled:
            with self._settle_cond:
                self._acks.extend(settled)
                self._settle_cond.notify()
            self._outcome[outcome].inc(len(settled))
        return settled

    def _nack(self, ack_ids: Sequence[str], outcome: str) -> None:
        settled = self._ledger.settle_many(list(ack_ids))
        if not settled:
            return
        with self._settle_cond:
            self._nacks.extend(settled)
            self._settle_cond.notify()
        self._outcome[outcome].inc(len(settled))

    def _update_held_gauges(self) -> None:
        self.metrics.in_flight.set(self._ledger.count)
        self.metrics.in_flight_bytes.set(self._ledger.bytes)

    def _settle_loop(self) -> None:
        while True:
            with self._settle_cond:
                self._settle_cond.wait_for(lambda: self._acks or self._nacks or self._settle_done, timeout=1.0)
                acks, self._acks = self._acks, []
                nacks, self._nacks = self._nacks, []
                done = self._settle_done
            if acks:
                self._send_settle(acks, None)
            if nacks:
                self._send_settle(nacks, 0)
            self._update_held_gauges()
            if done and not acks and not nacks:
                return

    def _lease_loop(self) -> None:
        check_every_s = min(1.0, self.settings.lease_margin_s / 4)
        while True:
            with self._settle_cond:
                if self._settle_cond.wait_for(lambda: self._settle_done, timeout=check_every_s):
                    return
            now = self._clock()
            due = self._ledger.due_for_extension(now)
            if not due:
                continue
            confirmed = self._send_settle(due, self.settings.lease_extension_s, attempts=1)
            self._ledger.extended(confirmed, now)
            self.metrics.lease_extensions.inc(len(confirmed))
            if len(confirmed) < len(due):
                # Left due: retried at the next check, well before the lease (margin_s) runs out.
                self.metrics.lease_extension_errors.inc(len(due) - len(confirmed))

    def _send_settle(self, ack_ids: Sequence[str], deadline_s: int | None, *, attempts: int = SETTLE_ATTEMPTS) -> list[str]:
        """Acks (`deadline_s` None), nacks (0) or extends leases, in chunks; returns the ack ids confirmed."""
        from google.api_core import exceptions as gexc

        what = "ack" if deadline_s is None else ("nack" if deadline_s == 0 else "lease extension")
        timeout = min(self.pubsub.pubsub_timeout_s, SHUTDOWN_FLUSH_S / 2)
        confirmed: list[str] = []
        for i in range(0, len(ack_ids), SETTLE_CHUNK):
            chunk = list(ack_ids[i : i + SETTLE_CHUNK])
            for attempt in range(1, attempts + 1):
                try:
                    # retry=None: the library's retry would block this thread for its whole timeout; ours
                    # is bounded, and a lease extension is retried at the next check instead.
                    if deadline_s is None:
                        self._subscriber.acknowledge(
                            request={"subscription": self._sub_path, "ack_ids": chunk}, timeout=timeout, retry=None
                        )
                    else:
                        self._subscriber.modify_ack_deadline(
                            request={"subscription": self._sub_path, "ack_ids": chunk, "ack_deadline_seconds": deadline_s},
                            timeout=timeout,
                            retry=None,
                        )
                except gexc.GoogleAPICallError as exc:
                    if attempt < attempts:
                        time.sleep(0.2 * 2**attempt)
                        continue
                    if deadline_s != self.settings.lease_extension_s:
                        self.metrics.settle_errors.inc(len(chunk))
                    log.warning("%s of %d messages failed: %s", what, len(chunk), exc)
                    break
                confirmed.extend(chunk)
                break
        return confirmed
