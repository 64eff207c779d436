"""Replay: republish matching dead letters to the comments topic (or park them), then ack them.

A replayed message is exactly what the producer sent (body, attributes with their original names,
ordering key) plus `esp_replay_count`. A letter that would pass `max_replays` is parked instead: in
ESP's own form with `esp_parked=true`, on the dead-letter topic or the park topic.

Windows: letters are republished in windows of at most `replay_window` (about one second's worth
when `--rate` is set). A window goes out as Publish requests whose answers name every message
Pub/Sub stored; exactly those letters are then acked. Nothing a letter carries can stop this
between the publish and the ack (no letter is read there, and one letter Pub/Sub refuses is found
by splitting the request and stays a dead letter), and Ctrl-C or SIGTERM waits for the window in
flight to be settled. So only a hard kill (SIGKILL, a lost machine) between a window's publish and
its ack leaves republished letters unacked: a re-run replays them again, at most one window,
which consumers absorb (they dedupe on id and model version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from esp.contracts import (
    ATTR_REPLAY_COUNT,
    MAX_ATTRIBUTES,
    MAX_PUBLISH_REQUEST_BYTES,
    MAX_REPLAY_COUNT,
    pubsub_message_bytes,
)
from esp.dead_letters.filters import PARKED_EXCLUDE, Filter
from esp.dead_letters.hold import HoldSession, holding, scan_note
from esp.dead_letters.letters import Letter
from esp.errors import ConfigError, EspError
from esp.pubsub import check_reachable, publisher_client, translate_errors, where
from esp.settings import PubSubSettings
from esp.settings.dead_letters import DeadLetterSettings

log = logging.getLogger(__name__)

REPLAY, PARK = "replay", "park"
# Pub/Sub's limits on one Publish request: 1,000 messages and 10,000,000 bytes (less the topic).
MAX_PUBLISH_MESSAGES = 1000
MAX_PUBLISH_BYTES = MAX_PUBLISH_REQUEST_BYTES - 1024


class RateLimiter:
    """Paces calls to at most `rate` per second (None: no limit); `clock`/`sleep` are injectable."""

    def __init__(
        self, rate: float | None, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    def wait(self) -> None:
        if not self.interval:
            return
        now = self._clock()
        if self._next is None or self._next < now:
            # Idle time is not banked: after a pause the rate does not burst.
            self._next = now
        if self._next > now:
            self._sleep(self._next - now)
        self._next += self.interval


def in_flight_window(window: int, rate: float | None) -> int:
    """At most `window` republishes in flight, and at most about one second's worth when paced."""
    if rate:
        return max(1, min(window, math.ceil(rate)))
    return window


@dataclasses.dataclass
class ReplayResult:
    dry_run: bool
    to_topic: str
    park_topic: str
    window: int
    scanned: int = 0
    matched: int = 0
    replayed: int = 0
    parked: int = 0
    failed: int = 0
    ack_failed: int = 0
    skipped_filter: int = 0
    skipped_parked: int = 0
    not_replayable: int = 0  # the letter does not hold the body whole (esp_kept): left as it is
    came_back: int = 0  # dead letters of messages this run itself published
    would_replay: int = 0
    would_park: int = 0
    limit_reached: bool = False
    interrupted: bool = False
    stopped: str | None = None  # why a replay stopped early (the topic refused everything)
    note: str = ""  # how far the scan went
    replayed_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.ack_failed and not self.interrupted and not self.stopped

    def summary(self) -> str:
        if self.dry_run:
            head = (
                f"dry run: {self.matched} of {self.scanned} dead letter(s) match; would replay "
                f"{self.would_replay} to {self.to_topic} and park {self.would_park}; nothing changed"
            )
        else:
            head = (
                f"replayed {self.replayed} to {self.to_topic}, parked {self.parked} on {self.park_topic}, "
                f"failed {self.failed}, ack failed {self.ack_failed} ({self.scanned} scanned, {self.matched} matched)"
            )
        extras = []
        if self.not_replayable:
            extras.append(
                f"{self.not_replayable} cannot be replayed as the producer sent them and are left as they are "
                "(the log says why: a body the dead letter could not keep whole, no room for the replay count, or "
                "replayed as often as the count can say; "
                "docs/dead-letters.md)"
            )
        if self.skipped_filter:
            extras.append(f"{self.skipped_filter} not matching left as they were")
        if self.skipped_parked:
            extras.append(f"{self.skipped_parked} parked skipped (--include-parked replays them)")
        if self.came_back:
            extras.append(f"{self.came_back} failed again after this run replayed them (left for the next run)")
        if self.ack_failed:
            extras.append(f"{self.ack_failed} republished but not acked: a re-run replays them again")
        if self.limit_reached:
            extras.append("--limit reached")
        if self.stopped:
            extras.append(f"STOPPED: {self.stopped}; what was republished is acked, the rest untouched")
        if self.interrupted:
            extras.append("INTERRUPTED: what was republished is acked, the rest untouched; run it again")
        if self.note:
            extras.append(self.note)
        return head + ("; " + "; ".join(extras) if extras else "")


def _topic_path(settings: PubSubSettings, topic: str) -> str:
    return topic if topic.startswith("projects/") else settings.topic_path(topic)


def _refuse_lossy_topics(settings: PubSubSettings, to_path: str, park_path: str) -> None:
    """Refuses topics that would lose a letter's verdict, or send a parked letter round again.

    Replayed to the dead-letter topic, a comment comes back as a letter with no reason (and a
    policy letter's own `esp_*` attributes would read as a verdict); replayed to the scores topic,
    it reaches score consumers. Parked onto the topic replays go to (the comments topic by
    default), a parked letter is scored again, dead-lettered again without its mark, and parked
    again by the next replay, for ever.
    """
    dead_letters = _topic_path(settings, settings.dead_letter_topic)
    if to_path in (dead_letters, _topic_path(settings, settings.scores_topic)):
        raise ConfigError(f"--to {to_path} is the {'dead-letter' if to_path == dead_letters else 'scores'} topic: "
                          "replay sends comments to be scored (the comments topic, or another the workers read)")
    if park_path in (to_path, _topic_path(settings, settings.comments_topic)):
        raise ConfigError(f"--park-topic {park_path} is a topic comments are replayed to or scored from: parked letters "
                          "would be scored again and never stay parked (leave it unset: the dead-letter topic)")


def replay(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    *,
    to_topic: str | None = None,
    limit: int | None = None,
    rate: float | None = None,
    dry_run: bool = False,
    max_messages: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Republishes matching dead letters (or parks those past `max_replays`) and acks each one
    only once Pub/Sub has stored its republished copy."""
    from google.pubsub_v1 import PublisherClient

    if to_topic is not None and not to_topic.strip():
        # `--to "$TOPIC"` with TOPIC unset: replaying to the comments topic instead is not what was asked.
        raise ConfigError("--to is empty: name the topic to replay to, or leave --to out for the comments topic")
    to_path = _topic_path(settings, to_topic or settings.comments_topic)
    park_path = _topic_path(settings, dl_settings.park_topic or settings.dead_letter_topic)
    _refuse_lossy_topics(settings, to_path, park_path)
    result = ReplayResult(
        dry_run=dry_run, to_topic=to_path, park_topic=park_path, window=in_flight_window(dl_settings.replay_window, rate)
    )
    check_reachable(settings)
    wrapper = publisher_client(settings)
    # Publish requests go straight to the API: the batching client takes attributes as keyword
    # arguments, which cannot carry names such as `timeout` or `data` that a producer may use.
    rpc = PublisherClient(transport=wrapper.transport)
    try:
        with translate_errors(settings, "checking the replay topics"):
            for path in {to_path, park_path}:
                rpc.get_topic(request={"topic": path}, timeout=settings.pubsub_timeout_s)
        with holding(settings, dl_settings, "replaying dead letters from") as session:
            run = _Run(session, _Publisher(rpc, settings), flt, result, dl_settings, limit, RateLimiter(rate), progress)
            try:
                run.scan(max_messages)
            except KeyboardInterrupt:
                # What was published is settled and acked by now; the rest is released on close.
                result.interrupted = True
            result.scanned = session.scanned
            result.note = scan_note(session, max_messages, dl_settings.max_scan_s)
    finally:
        wrapper.stop()
        wrapper.transport.close()
    return result


@dataclasses.dataclass
class _Published:
    stored: list[tuple[Letter, str]] = dataclasses.field(default_factory=list)  # with the new message id
    refused: list[tuple[Letter, str]] = dataclasses.field(default_factory=list)  # with Pub/Sub's reason
    unsent: list[Letter] = dataclasses.field(default_factory=list)  # not sent after the topic failed
    error: str | None = None


class _Publisher:
    """Publish requests of at most Pub/Sub's size, split to find a message Pub/Sub refuses."""

    def __init__(self, rpc: Any, settings: PubSubSettings) -> None:
        from google.api_core import exceptions as gexc
        from google.api_core import retry as retries

        self.rpc = rpc
        self.settings = settings
        self.refused = (gexc.InvalidArgument, gexc.FailedPrecondition)
        self.retry = retries.Retry(
            initial=0.1,
            maximum=2.0,
            multiplier=2.0,
            predicate=retries.if_exception_type(
                gexc.Aborted, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.ResourceExhausted,
                gexc.ServiceUnavailable, gexc.Unknown,
            ),
            timeout=settings.pubsub_timeout_s,
        )  # fmt: skip

    def publish(self, topic: str, messages: list[tuple[Letter, dict[str, Any]]]) -> _Published:
        """Publishes (letter, message) pairs in order, in requests of at most Pub/Sub's size. A
        message Pub/Sub refuses for its content is found by splitting; any other failure is the
        topic's, and what was not stored before it is left unsent."""
        out = _Published()
        for chunk in _request_chunks(messages):
            if out.error is None:
                try:
                    self._publish(topic, chunk, out.stored, out.refused)
                except Exception as exc:  # the topic failed: report it; stored letters still get acked
                    out.error = f"publishing to {topic} on {where(self.settings)} failed: {exc}"
        settled = {x.message_id for x, _ in out.stored} | {x.message_id for x, _ in out.refused}
        out.unsent = [letter for letter, _ in messages if letter.message_id not in settled]
        return out

    def _publish(self, topic: str, chunk: list[tuple[Letter, dict[str, Any]]], stored: list, refused: list) -> None:
        try:
            response = self.rpc.publish(
                request={"topic": topic, "messages": [m for _, m in chunk]},
                retry=self.retry,
                timeout=self.settings.pubsub_timeout_s,
            )
        except self.refused as exc:
            if len(chunk) == 1:
                refused.append((chunk[0][0], f"{type(exc).__name__}: {exc.message}"))
                return
            half = len(chunk) // 2
            self._publish(topic, chunk[:half], stored, refused)
            self._publish(topic, chunk[half:], stored, refused)
            return
        ids = list(response.message_ids)
        if len(ids) != len(chunk):
            # Pub/Sub answers one id per message; anything else leaves the window unsettled.
            raise EspError(f"publishing to {topic}: {len(chunk)} messages sent, {len(ids)} ids answered")
        stored.extend((letter, mid) for (letter, _), mid in zip(chunk, ids))


def _request_chunks(messages: list[tuple[Letter, dict[str, Any]]]) -> Iterator[list[tuple[Letter, dict[str, Any]]]]:
    chunk: list[tuple[Letter, dict[str, Any]]] = []
    size = 0
    for letter, message in messages:
        n = pubsub_message_bytes(message["data"], message["attributes"], message.get("ordering_key", ""))
        if chunk and (size + n > MAX_PUBLISH_BYTES or len(chunk) >= MAX_PUBLISH_MESSAGES):
            yield chunk
            chunk, size = [], 0
        chunk.append((letter, message))
        size += n
    if chunk:
        yield chunk


def _cannot_replay(letter: Letter) -> str | None:
    """Why republishing this letter could not send exactly what the producer sent, if it could not."""
    d = letter.dead_letter
    if not d.replayable:
        return d.kept_note()
    if len({**d.attributes, ATTR_REPLAY_COUNT: ""}) > MAX_ATTRIBUTES:
        return f"the comment has {len(d.attributes)} attributes: no room for {ATTR_REPLAY_COUNT} (export it instead)"
    if d.replay_count >= MAX_REPLAY_COUNT:
        # A higher count is not believed when the comment comes back (it reads as the producer's own
        # attribute, count 0): its history would start again, and a poison forced on with
        # --include-parked would cycle for ever.
        return f"replayed {d.replay_count} times already, the most {ATTR_REPLAY_COUNT} counts (export it instead)"
    return None


def _replay_message(letter: Letter) -> dict[str, Any]:
    d = letter.dead_letter
    attributes = {**d.attributes, ATTR_REPLAY_COUNT: str(d.replay_count + 1)}
    return {"data": d.data, "attributes": attributes, "ordering_key": d.ordering_key}


def _park_message(letter: Letter) -> dict[str, Any]:
    # ESP's own form, whatever the letter was (a policy letter too), so the parked mark is believed
    # when it is read again. Published without an ordering key, like the worker's dead letters.
    data, attributes = dataclasses.replace(letter.dead_letter, parked=True).to_message()
    return {"data": data, "attributes": attributes}


@contextlib.contextmanager
def _settle_before_interrupt() -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM back until the block ends, then raises KeyboardInterrupt.

    A publish whose answer was abandoned would leave republished letters unacked: duplicates on
    the next run. Each block is bounded by the publish and ack deadlines.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    # A signal the process was started with ignored (SIGINT in a background job of a shell
    # without job control) stays ignored: catching it here alone would interrupt a replay only
    # when the signal happened to land inside a block.
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


class _Run:
    """One replay: decides per letter, publishes window by window, acks what Pub/Sub stored."""

    def __init__(
        self,
        session: HoldSession,
        publisher: _Publisher,
        flt: Filter,
        result: ReplayResult,
        dl_settings: DeadLetterSettings,
        limit: int | None,
        limiter: RateLimiter,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.session = session
        self.publisher = publisher
        self.flt = flt
        self.result = result
        self.max_replays = dl_settings.max_replays
        self.limit = limit
        self.limiter = limiter
        self.progress = progress
        self.published_ids: set[str] = set()  # message ids this run published, to recognise them coming back
        self.pending: list[tuple[Letter, str]] = []

    def scan(self, max_messages: int | None) -> None:
        result = self.result
        for batch in self.session.scan(max_messages=max_messages):
            for letter in batch:
                action = self._decide(letter)
                if action is None or result.dry_run:
                    continue  # left leased until the end, then released untouched
                self.pending.append((letter, action))
                if len(self.pending) >= result.window:
                    self._flush()
                if result.stopped:
                    return
            # Do not let a partial window wait for the next pull: settle what this batch started.
            self._flush()
            if result.stopped or self.limit is not None and result.matched >= self.limit:
                return

    def _decide(self, letter: Letter) -> str | None:
        result, d = self.result, letter.dead_letter
        if letter.message_id in self.published_ids:
            return None  # our own parked copy, back on the dead-letter topic
        if d.source_message_id and d.source_message_id in self.published_ids:
            result.came_back += 1
            return None
        if not self.flt.matches(letter):
            if d.parked and self.flt.parked == PARKED_EXCLUDE and self.flt.matches_ignoring_parked(letter):
                result.skipped_parked += 1
            else:
                result.skipped_filter += 1
            return None
        if self.limit is not None and result.matched >= self.limit:
            result.limit_reached = True
            return None
        result.matched += 1
        # A parked letter replayed on purpose (--include-parked) is not parked again.
        action = PARK if not d.parked and d.replay_count + 1 > self.max_replays else REPLAY
        why_not = _cannot_replay(letter) if action == REPLAY else None
        if why_not:
            result.not_replayable += 1
            log.warning("dead letter %s cannot be replayed: %s", letter.message_id, why_not)
            return None
        if action == PARK:
            result.would_park += 1
        else:
            result.would_replay += 1
        return action

    def _flush(self) -> None:
        """Publishes the pending window, then acks exactly the letters Pub/Sub stored."""
        if not self.pending:
            return
        work, self.pending = self.pending, []
        by_topic: dict[str, list[tuple[Letter, dict[str, Any]]]] = {self.result.to_topic: [], self.result.park_topic: []}
        for letter, action in work:
            self.limiter.wait()
            topic = self.result.park_topic if action == PARK else self.result.to_topic
            by_topic[topic].append((letter, _park_message(letter) if action == PARK else _replay_message(letter)))
        with _settle_before_interrupt():
            stored: list[tuple[Letter, str]] = []
            for topic, messages in by_topic.items():
                if not messages or self.result.stopped:
                    continue
                out = self.publisher.publish(topic, messages)
                stored.extend(out.stored)
                for letter, why in out.refused:
                    log.error("Pub/Sub refused the republished dead letter %s (%s); it stays a dead letter", letter.message_id, why)
                self.result.failed += len(out.refused) + len(out.unsent)
                if out.error:
                    log.error("%s; stopping the replay", out.error)
                    self.result.stopped = out.error
            self._settle(stored, work)

    def _settle(self, stored: list[tuple[Letter, str]], work: list[tuple[Letter, str]]) -> None:
        action_of = {letter.message_id: action for letter, action in work}
        for letter, message_id in stored:
            self.published_ids.add(message_id)
            if action_of[letter.message_id] == PARK:
                self.result.parked += 1
            else:
                self.result.replayed += 1
                self.result.replayed_ids.append(letter.comment_id or letter.message_id)
        if stored:
            self.result.ack_failed += self.session.ack(letter for letter, _ in stored)
            if self.progress:
                self.progress(len(stored))
