"""Dead letters: look at them, export, replay and purge them, without losing any.

Pub/Sub has neither peek nor redrive, so everything here works on the dead-letter hold
subscription with leases. A scan pulls until the subscription has returned nothing for a while
(`pull_idle_s`) or a bound is reached, and *holds* the lease of every message it pulled, renewing
them in the background, until it is done: nacking early would hand the same messages straight back
to the next pull. At the end whatever was not acked is nacked (the hold subscription has no
dead-letter policy of its own, so this costs nothing).

Replay acks a dead letter only after Pub/Sub confirmed its republish, in windows of at most
`replay_window` messages (about one second's worth when `--rate` is set), so a crash at any point
loses nothing and can duplicate at most one window. Both kinds of dead letter are handled: the
worker's own (reason in `esp_*` attributes) and those Pub/Sub's dead-letter policy forwarded
(only `CloudPubSubDeadLetterSource*` attributes, no reason); esp.contracts.DeadLetter reads both.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from esp.contracts import (
    ATTR_ORDERING_KEY,
    ATTR_PARKED,
    ATTR_PREFIX,
    ATTR_REPLAY_COUNT,
    ATTR_STAGE,
    ATTR_WORKER,
    POLICY_ATTR_PREFIX,
    DeadLetter,
    rfc3339,
    utc_now,
)
from esp.errors import EspError
from esp.pubsub import check_reachable, publisher_client, subscriber_client, translate_errors
from esp.settings import PubSubSettings
from esp.settings.dead_letters import DeadLetterSettings

log = logging.getLogger(__name__)

# Pub/Sub's limits: at most 1,000 messages per Pull; ack/modack requests are kept well under the
# 512 KB request limit at this many ack ids (an ack id is a few hundred bytes).
PULL_MAX = 1000
ACK_CHUNK = 1000
# Between two empty pulls, so an idle wait does not spin on the server.
EMPTY_PULL_PAUSE_S = 0.2
# One Pull call's deadline: an empty subscription holds a pull open (the emulator for about a
# second), so a pull never waits longer than the idle window has left, nor less than the minimum.
PULL_TIMEOUT_S = 2.0
MIN_PULL_TIMEOUT_S = 0.25

PARKED_ANY, PARKED_EXCLUDE, PARKED_ONLY = "include", "exclude", "only"
# The error type shown for a message on the dead-letter topic whose esp_* attributes do not parse.
UNREADABLE = "unreadable_dead_letter"


# ---------------------------------------------------------------------------------------------
# One pulled dead letter


@dataclasses.dataclass
class Letter:
    """A dead letter as pulled from the hold subscription: the message, its lease and its reading."""

    ack_id: str
    message_id: str
    publish_time: dt.datetime
    data: bytes
    attributes: dict[str, str]  # exactly as on the dead-letter message
    ordering_key: str
    dead_letter: DeadLetter

    @classmethod
    def from_received(cls, received: Any) -> Letter:
        msg = received.message
        attrs = dict(msg.attributes)
        publish_time = _as_utc(msg.publish_time)
        dead_letter = _read_dead_letter(bytes(msg.data), attrs, publish_time, msg.ordering_key)
        return cls(
            ack_id=received.ack_id,
            message_id=msg.message_id,
            publish_time=publish_time,
            data=bytes(msg.data),
            attributes=attrs,
            # The comment's key: the message's own, or the one the worker kept as an attribute.
            ordering_key=dead_letter.ordering_key,
            dead_letter=dead_letter,
        )

    @functools.cached_property
    def comment_id(self) -> str | None:
        """The comment's id when the body parses as a comment object; None for poison bodies."""
        try:
            obj = json.loads(self.data)
        except (ValueError, UnicodeDecodeError):
            return None
        cid = obj.get("id") if isinstance(obj, dict) else None
        return cid if isinstance(cid, str) and cid else None

    @property
    def failed_at(self) -> dt.datetime:
        return _as_utc(self.dead_letter.time)

    def ids(self) -> set[str]:
        """Every id an operator may know this dead letter by."""
        found = {self.message_id}
        if self.comment_id:
            found.add(self.comment_id)
        if self.dead_letter.source_message_id:
            found.add(self.dead_letter.source_message_id)
        return found

    def classification(self, now: dt.datetime | None = None) -> dict[str, Any]:
        d = self.dead_letter
        now = now or utc_now()
        return {
            "message_id": self.message_id,
            "comment_id": self.comment_id,
            "kind": d.kind,
            "stage": d.stage,
            "error_type": d.error_type,
            "reason": d.reason,
            "delivery_attempts": d.delivery_attempt,
            "replay_count": d.replay_count,
            "parked": d.parked,
            "dead_lettered_at": rfc3339(self.failed_at),
            "age_s": round(max(0.0, (now - self.failed_at).total_seconds()), 3),
            "worker": d.worker or None,
            "source_subscription": d.source_subscription,
            "source_message_id": d.source_message_id,
        }

    def to_record(self) -> dict[str, Any]:
        """One JSONL line of `export`: everything needed to republish it by hand, and why it failed."""
        try:
            text, encoding = self.data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(self.data).decode("ascii"), "base64"
        return {
            "message_id": self.message_id,
            "publish_time": rfc3339(self.publish_time),
            "ordering_key": self.ordering_key,
            "attributes": dict(sorted(self.attributes.items())),
            "data": text,
            "data_encoding": encoding,
            "classification": self.classification(),
        }

    def replay_attributes(self, replay_count: int) -> dict[str, str]:
        """The original attributes (no esp_* ones, no policy ones) plus the replay counter."""
        return {**self.dead_letter.attributes, ATTR_REPLAY_COUNT: str(replay_count)}

    def parked_attributes(self) -> dict[str, str]:
        """Everything the dead letter carried, so it still reads the same, marked parked."""
        return {**self.attributes, ATTR_PARKED: "true"}


def _read_dead_letter(data: bytes, attrs: dict[str, str], publish_time: dt.datetime, ordering_key: str) -> DeadLetter:
    try:
        return DeadLetter.from_pubsub(data, attrs, publish_time=publish_time, ordering_key=ordering_key)
    except ValueError as exc:
        # Someone else's message on the dead-letter topic, or a mangled one: still list it (and let
        # it be exported or purged) rather than let one message stop the whole scan.
        return DeadLetter(
            data=data,
            attributes={k: v for k, v in attrs.items() if not k.startswith(ATTR_PREFIX) and not k.startswith(POLICY_ATTR_PREFIX)},
            stage=attrs.get(ATTR_STAGE, "unknown"),
            error_type=UNREADABLE,
            reason=f"dead-letter attributes could not be read: {exc}",
            worker=attrs.get(ATTR_WORKER, ""),
            time=publish_time,
            ordering_key=ordering_key or attrs.get(ATTR_ORDERING_KEY, ""),
            parked=attrs.get(ATTR_PARKED) == "true",
        )


def _as_utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        return t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc)


def record_data(record: dict[str, Any]) -> bytes:
    """The original body of an exported record."""
    if record.get("data_encoding") == "base64":
        return base64.b64decode(record["data"])
    return str(record["data"]).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Filters


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time: ISO-8601 (`2024-05-01T12:00Z`, naive means UTC) or an age (`90m`, `2h`, `3d`)."""
    value = value.strip()
    m = _DURATION.match(value)
    if m:
        return (now or utc_now()) - dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither an ISO-8601 time nor an age such as 30m, 2h or 3d") from None
    return _as_utc(t)


def read_ids_file(path: Path) -> list[str]:
    """Ids, one per line; blank lines and lines starting with # are ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which dead letters a command acts on; an empty field matches everything."""

    stages: frozenset[str] = frozenset()
    error_types: frozenset[str] = frozenset()
    reason_contains: tuple[str, ...] = ()  # case-insensitive substrings, any one matches
    kinds: frozenset[str] = frozenset()
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    ids: frozenset[str] = frozenset()
    parked: str = PARKED_ANY

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"--since {rfc3339(self.since)} is after --until {rfc3339(self.until)}")
        if self.parked not in (PARKED_ANY, PARKED_EXCLUDE, PARKED_ONLY):
            raise ValueError(f"parked must be one of include, exclude, only, not {self.parked!r}")

    def matches(self, letter: Letter) -> bool:
        d = letter.dead_letter
        if self.parked == PARKED_EXCLUDE and d.parked or self.parked == PARKED_ONLY and not d.parked:
            return False
        if self.stages and d.stage not in self.stages:
            return False
        if self.error_types and d.error_type not in self.error_types:
            return False
        if self.kinds and d.kind not in self.kinds:
            return False
        if self.reason_contains and not any(r.lower() in d.reason.lower() for r in self.reason_contains):
            return False
        if self.since and letter.failed_at < self.since:
            return False
        if self.until and letter.failed_at > self.until:
            return False
        if self.ids and not (self.ids & letter.ids()):
            return False
        return True

    def describe(self) -> str:
        parts = []
        for name, values in (("stage", self.stages), ("error type", self.error_types), ("kind", self.kinds)):
            if values:
                parts.append(f"{name} in {sorted(values)}")
        if self.reason_contains:
            parts.append(f"reason contains any of {list(self.reason_contains)}")
        if self.since:
            parts.append(f"since {rfc3339(self.since)}")
        if self.until:
            parts.append(f"until {rfc3339(self.until)}")
        if self.ids:
            parts.append(f"{len(self.ids)} id(s)")
        if self.parked != PARKED_ANY:
            parts.append(f"parked: {self.parked}")
        return ", ".join(parts) or "all"


# ---------------------------------------------------------------------------------------------
# The hold subscription, with leases held for as long as a command runs


class HoldSession:
    """Pulls dead letters and holds their leases until acked, released, or the session closes.

    A background thread renews every held lease each third of `lease_s`. Closing the session nacks
    (releases) whatever is still held, so the messages are visible again at once; if the process
    dies instead, they become visible when their lease runs out, at most `lease_s` later.
    """

    def __init__(self, settings: PubSubSettings, dl_settings: DeadLetterSettings, *, subscription: str | None = None) -> None:
        self.settings = settings
        self.lease_s = dl_settings.dead_letter_lease_s
        self.idle_s = dl_settings.pull_idle_s
        self.min_scan_s = dl_settings.min_scan_s
        self.path = settings.subscription_path(subscription or settings.dead_letter_subscription)
        self.client = subscriber_client(settings)
        self._held: dict[str, str] = {}  # message_id -> ack_id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_leases, name="esp-dead-letter-leases", daemon=True)
        self._keeper.start()

    # -- pulling

    def scan(self, *, max_messages: int | None = None) -> Iterator[list[Letter]]:
        """Yields batches of newly pulled dead letters until the subscription stays empty for
        `idle_s` (and `min_scan_s` have passed) or `max_messages` have been pulled. Every yielded
        letter stays leased."""
        pulled = 0
        idle_since = started = time.monotonic()
        while max_messages is None or pulled < max_messages:
            want = PULL_MAX if max_messages is None else min(PULL_MAX, max_messages - pulled)
            idle_left = self.idle_s - (time.monotonic() - idle_since)
            received = self._pull(want, timeout_s=min(PULL_TIMEOUT_S, max(MIN_PULL_TIMEOUT_S, idle_left)))
            fresh = self._hold(received)
            if received:
                idle_since = time.monotonic()
            if fresh:
                pulled += len(fresh)
                yield fresh
                continue
            now = time.monotonic()
            if now - idle_since >= self.idle_s and now - started >= self.min_scan_s:
                return
            time.sleep(EMPTY_PULL_PAUSE_S)

    def _pull(self, want: int, *, timeout_s: float) -> list[Any]:
        from google.api_core import exceptions as gexc

        try:
            resp = self.client.pull(
                request={"subscription": self.path, "max_messages": want}, timeout=timeout_s, retry=None
            )
        except gexc.DeadlineExceeded:
            # An empty subscription may hold the pull open until its deadline: that is "nothing now".
            return []
        return list(resp.received_messages)

    def _hold(self, received: Sequence[Any]) -> list[Letter]:
        if not received:
            return []
        fresh: list[Letter] = []
        with self._lock:
            for r in received:
                mid = r.message.message_id
                if mid in self._held:
                    # A redelivery of one we already hold (its lease lapsed): keep the newest lease only.
                    self._held[mid] = r.ack_id
                    continue
                self._held[mid] = r.ack_id
                fresh.append(Letter.from_received(r))
        # Set our own lease at once: if this process dies, the messages come back after lease_s,
        # not after the subscription's (possibly much longer) ack deadline.
        self._modack([r.ack_id for r in received], self.lease_s)
        return fresh

    # -- settling

    def ack(self, letters: Iterable[Letter]) -> int:
        """Acks (consumes) `letters`; returns how many could not be acked."""
        ack_ids = self._take(letters)
        failed = 0
        for chunk in _chunks(ack_ids, ACK_CHUNK):
            try:
                self.client.acknowledge(request={"subscription": self.path, "ack_ids": chunk}, timeout=self.settings.pubsub_timeout_s)
            except Exception as exc:  # the messages simply come back later: report, do not stop
                log.error("acknowledging %d dead letter(s) failed: %s", len(chunk), exc)
                failed += len(chunk)
        return failed

    def close(self) -> None:
        """Stops renewing leases and releases everything still held."""
        self._stop.set()
        self._keeper.join(timeout=5)
        with self._lock:
            ack_ids = list(self._held.values())
            self._held.clear()
        try:
            self._release_ids(ack_ids)
        finally:
            self.client.close()

    def _take(self, letters: Iterable[Letter]) -> list[str]:
        with self._lock:
            return [ack for ack in (self._held.pop(x.message_id, None) for x in letters) if ack is not None]

    def _release_ids(self, ack_ids: list[str]) -> None:
        if ack_ids:
            self._modack(ack_ids, 0)

    def _modack(self, ack_ids: list[str], seconds: int) -> None:
        for chunk in _chunks(ack_ids, ACK_CHUNK):
            try:
                self.client.modify_ack_deadline(
                    request={"subscription": self.path, "ack_ids": chunk, "ack_deadline_seconds": seconds},
                    timeout=self.settings.pubsub_timeout_s,
                )
            except Exception as exc:  # a lapsed lease only means a later redelivery, never a loss
                log.warning("setting the lease of %d dead letter(s) to %ds failed: %s", len(chunk), seconds, exc)

    def _keep_leases(self) -> None:
        period = self.lease_s / 3
        while not self._stop.wait(period):
            with self._lock:
                ack_ids = list(self._held.values())
            if ack_ids:
                self._modack(ack_ids, self.lease_s)


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


# ---------------------------------------------------------------------------------------------
# Looking: list, show, stats


@dataclasses.dataclass
class PeekResult:
    letters: list[Letter]  # the matching ones, oldest first
    scanned: int
    hit_max: bool


def peek(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    *,
    max_messages: int | None,
    subscription: str | None = None,
) -> PeekResult:
    """Reads up to `max_messages` dead letters without consuming any: all are nacked back at the end."""
    check_reachable(settings)
    with translate_errors(settings, f"reading dead letters from {subscription or settings.dead_letter_subscription}"):
        session = HoldSession(settings, dl_settings, subscription=subscription)
        scanned = 0
        matching: list[Letter] = []
        try:
            for batch in session.scan(max_messages=max_messages):
                scanned += len(batch)
                matching.extend(x for x in batch if flt.matches(x))
        finally:
            session.close()
    matching.sort(key=lambda x: x.failed_at)
    return PeekResult(matching, scanned, max_messages is not None and scanned >= max_messages)


@dataclasses.dataclass
class Group:
    kind: str
    stage: str
    error_type: str
    count: int = 0
    oldest: dt.datetime | None = None
    newest: dt.datetime | None = None
    parked: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, letter: Letter) -> None:
        self.count += 1
        t = letter.failed_at
        self.oldest = t if self.oldest is None or t < self.oldest else self.oldest
        self.newest = t if self.newest is None or t > self.newest else self.newest
        self.parked += letter.dead_letter.parked
        self.reasons[letter.dead_letter.reason] += 1

    def to_dict(self, top_reasons: int = 10) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stage": self.stage,
            "error_type": self.error_type,
            "count": self.count,
            "parked": self.parked,
            "oldest": rfc3339(self.oldest) if self.oldest else None,
            "newest": rfc3339(self.newest) if self.newest else None,
            "reasons": dict(self.reasons.most_common(top_reasons)),
            "distinct_reasons": len(self.reasons),
        }


@dataclasses.dataclass
class Stats:
    total: int
    parked: int
    oldest: dt.datetime | None
    newest: dt.datetime | None
    by_kind: dict[str, int]
    groups: list[Group]  # largest first

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "parked": self.parked,
            "oldest": rfc3339(self.oldest) if self.oldest else None,
            "newest": rfc3339(self.newest) if self.newest else None,
            "by_kind": self.by_kind,
            "groups": [g.to_dict() for g in self.groups],
        }


def compute_stats(letters: Sequence[Letter]) -> Stats:
    """Counts grouped by stage and error type (each group lists its reasons), oldest and newest."""
    groups: dict[tuple[str, str, str], Group] = {}
    for x in letters:
        d = x.dead_letter
        key = (d.kind, d.stage, d.error_type)
        groups.setdefault(key, Group(*key)).add(x)
    times = [x.failed_at for x in letters]
    return Stats(
        total=len(letters),
        parked=sum(x.dead_letter.parked for x in letters),
        oldest=min(times) if times else None,
        newest=max(times) if times else None,
        by_kind=dict(collections.Counter(x.dead_letter.kind for x in letters)),
        groups=sorted(groups.values(), key=lambda g: (-g.count, g.stage, g.error_type)),
    )


# ---------------------------------------------------------------------------------------------
# Export


@dataclasses.dataclass
class ExportResult:
    path: Path
    scanned: int = 0
    written: int = 0
    acked: int = 0
    ack_failed: int = 0


def write_jsonl_atomically(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Writes JSONL to a temporary file beside `path`, fsyncs it, renames it over `path`, fsyncs
    the directory: a reader (or a crash) sees either no file or the complete one."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False, sort_keys=True))
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return n


def export(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    path: Path,
    *,
    max_messages: int | None = None,
    consume: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Writes the matching dead letters to `path` as JSONL; with `consume`, acks them only after the
    file is safely on disk (fsynced and renamed into place)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise EspError(f"{path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise EspError(f"directory {path.parent} does not exist")
    check_reachable(settings)
    result = ExportResult(path)
    with translate_errors(settings, f"exporting dead letters from {settings.dead_letter_subscription}"):
        session = HoldSession(settings, dl_settings)
        try:
            matching: list[Letter] = []
            for batch in session.scan(max_messages=max_messages):
                result.scanned += len(batch)
                matching.extend(x for x in batch if flt.matches(x))
            matching.sort(key=lambda x: x.failed_at)
            result.written = write_jsonl_atomically(path, (x.to_record() for x in matching))
            if consume:
                result.ack_failed = session.ack(matching)
                result.acked = len(matching) - result.ack_failed
        finally:
            session.close()
    return result


# ---------------------------------------------------------------------------------------------
# Replay


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
        self._next = None

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


REPLAY, PARK = "replay", "park"


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
    came_back: int = 0  # dead letters of messages this run itself published
    would_replay: int = 0
    would_park: int = 0
    limit_reached: bool = False
    interrupted: bool = False
    replayed_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.ack_failed and not self.interrupted

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
        if self.skipped_filter:
            extras.append(f"{self.skipped_filter} not matching left as they were")
        if self.skipped_parked:
            extras.append(f"{self.skipped_parked} parked skipped (--include-parked replays them)")
        if self.came_back:
            extras.append(f"{self.came_back} failed again after this run replayed them (left for the next run)")
        if self.limit_reached:
            extras.append("--limit reached")
        if self.interrupted:
            extras.append("INTERRUPTED: what was republished is acked, the rest untouched; run it again")
        return head + ("; " + "; ".join(extras) if extras else "")


def _topic_path(settings: PubSubSettings, topic: str) -> str:
    return topic if topic.startswith("projects/") else settings.topic_path(topic)


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
    """Republishes matching dead letters (original body, attributes and ordering key, plus
    `esp_replay_count`), or parks those past `max_replays`; acks each only after its publish is confirmed."""
    from google.cloud import pubsub_v1

    to_path = _topic_path(settings, to_topic or settings.comments_topic)
    park_path = _topic_path(settings, dl_settings.park_topic or settings.dead_letter_topic)
    window = in_flight_window(dl_settings.replay_window, rate)
    result = ReplayResult(dry_run=dry_run, to_topic=to_path, park_topic=park_path, window=window)
    check_reachable(settings)
    publisher = publisher_client(
        settings, publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    try:
        with translate_errors(settings, "checking the replay topics"):
            for path in {to_path, park_path}:
                publisher.get_topic(request={"topic": path}, timeout=settings.pubsub_timeout_s)
        with translate_errors(settings, f"replaying dead letters from {settings.dead_letter_subscription}"):
            session = HoldSession(settings, dl_settings)
            try:
                _replay_scan(session, publisher, flt, result, dl_settings, limit, RateLimiter(rate), max_messages, progress)
            except KeyboardInterrupt:
                # What was published is settled and acked by now; the rest is released below.
                result.interrupted = True
            finally:
                session.close()
    finally:
        publisher.stop()
        publisher.transport.close()
    return result


def _replay_scan(
    session: HoldSession,
    publisher: Any,
    flt: Filter,
    result: ReplayResult,
    dl_settings: DeadLetterSettings,
    limit: int | None,
    limiter: RateLimiter,
    max_messages: int | None,
    progress: Callable[[int], None] | None,
) -> None:
    published_ids: set[str] = set()  # message ids this run published, to recognise them coming back
    # Only an exception leaves `pending` unpublished: those stay dead letters, released at the end
    # like everything else not acted on.
    pending: list[tuple[Letter, str]] = []
    for batch in session.scan(max_messages=max_messages):
        for letter in batch:
            result.scanned += 1
            d = letter.dead_letter
            # Everything not acted on below stays leased until the end, then is released untouched.
            if letter.message_id in published_ids:
                continue  # our own parked copy, back on the dead-letter topic
            if d.source_message_id and d.source_message_id in published_ids:
                result.came_back += 1
                continue
            if not flt.matches(letter):
                if d.parked and flt.parked == PARKED_EXCLUDE and _matches_ignoring_parked(flt, letter):
                    result.skipped_parked += 1
                else:
                    result.skipped_filter += 1
                continue
            if limit is not None and result.matched >= limit:
                result.limit_reached = True
                continue
            result.matched += 1
            # A parked letter replayed on purpose (--include-parked) is not parked again.
            action = PARK if not d.parked and d.replay_count + 1 > dl_settings.max_replays else REPLAY
            if result.dry_run:
                if action == PARK:
                    result.would_park += 1
                else:
                    result.would_replay += 1
                continue
            pending.append((letter, action))
            if len(pending) >= result.window:
                _flush(session, publisher, pending, result, limiter, published_ids, progress)
        # Do not let a partial window wait for the next pull: settle what this batch started.
        _flush(session, publisher, pending, result, limiter, published_ids, progress)
        if limit is not None and result.matched >= limit:
            result.limit_reached = True
            break


def _matches_ignoring_parked(flt: Filter, letter: Letter) -> bool:
    return dataclasses.replace(flt, parked=PARKED_ANY).matches(letter)


def _flush(
    session: HoldSession,
    publisher: Any,
    pending: list[tuple[Letter, str]],
    result: ReplayResult,
    limiter: RateLimiter,
    published_ids: set[str],
    progress: Callable[[int], None] | None,
) -> None:
    """Publishes `pending`, waits for every confirmation, then acks exactly the confirmed ones.

    Interrupted half-way (Ctrl-C), it still settles what it already published, so only a hard kill
    can leave republished-but-unacked letters: at most one window, replayed again next run.
    """
    if not pending:
        return
    work, pending[:] = list(pending), []
    started: list[tuple[Letter, str, Any]] = []
    try:
        for letter, action in work:
            limiter.wait()
            if action == PARK:
                future = publisher.publish(
                    result.park_topic, letter.data, ordering_key=letter.ordering_key, **letter.parked_attributes()
                )
            else:
                future = publisher.publish(
                    result.to_topic,
                    letter.data,
                    ordering_key=letter.ordering_key,
                    **letter.replay_attributes(letter.dead_letter.replay_count + 1),
                )
            started.append((letter, action, future))
    finally:
        confirmed: list[Letter] = []
        timeout = session.settings.pubsub_timeout_s
        interrupted: BaseException | None = None
        for letter, action, future in started:
            topic = result.park_topic if action == PARK else result.to_topic
            error: Exception | None = None
            while True:
                try:
                    message_id = future.result(timeout=timeout)
                except KeyboardInterrupt as exc:
                    # Keep waiting (each wait is bounded by the timeout): an abandoned confirmation
                    # would leave a published message unacked, i.e. a duplicate on the next run.
                    interrupted = exc
                    continue
                except Exception as exc:  # one failed publish must not stop the others
                    error = exc
                break
            if error is not None:
                result.failed += 1
                log.error("republishing dead letter %s to %s failed: %s", letter.message_id, topic, error)
                if letter.ordering_key:
                    # An ordered publisher pauses a key after a failure until told to resume.
                    publisher.resume_publish(topic, letter.ordering_key)
                continue  # it stays a dead letter
            published_ids.add(message_id)
            confirmed.append(letter)
            if action == PARK:
                result.parked += 1
            else:
                result.replayed += 1
                result.replayed_ids.append(letter.comment_id or letter.message_id)
        if confirmed:
            result.ack_failed += session.ack(confirmed)
            if progress:
                progress(len(confirmed))
        if interrupted is not None:
            raise interrupted


# ---------------------------------------------------------------------------------------------
# Purge


@dataclasses.dataclass
class PurgeResult:
    dry_run: bool
    scanned: int = 0
    matched: int = 0
    purged: int = 0
    ack_failed: int = 0
    limit_reached: bool = False


def purge(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    max_messages: int | None = None,
) -> PurgeResult:
    """Acks (discards for good) the matching dead letters; the rest are released untouched."""
    check_reachable(settings)
    result = PurgeResult(dry_run=dry_run)
    with translate_errors(settings, f"purging dead letters from {settings.dead_letter_subscription}"):
        session = HoldSession(settings, dl_settings)
        try:
            for batch in session.scan(max_messages=max_messages):
                result.scanned += len(batch)
                chosen = []
                for letter in batch:
                    if not flt.matches(letter):
                        continue
                    if limit is not None and result.matched >= limit:
                        result.limit_reached = True
                        continue
                    result.matched += 1
                    chosen.append(letter)
                if chosen and not dry_run:
                    failed = session.ack(chosen)
                    result.ack_failed += failed
                    result.purged += len(chosen) - failed
                if limit is not None and result.matched >= limit:
                    result.limit_reached = True
                    break
        finally:
            session.close()
    return result


# ---------------------------------------------------------------------------------------------
# Formatting for people


def format_age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


LIST_COLUMNS = (
    ("AGE", 8),
    ("KIND", 6),
    ("STAGE", 8),
    ("ERROR TYPE", 30),
    ("TRIES", 5),
    ("REPLAYS", 7),
    ("ID", 24),
    ("MESSAGE ID", 18),
)


def format_table(letters: Sequence[Letter], now: dt.datetime | None = None) -> list[str]:
    now = now or utc_now()
    header = " ".join(f"{name:<{w}}" for name, w in LIST_COLUMNS) + " REASON"
    lines = [header]
    for x in letters:
        c = x.classification(now)
        error = c["error_type"] + (" [parked]" if c["parked"] else "")
        cells = (
            format_age(c["age_s"]),
            c["kind"],
            c["stage"],
            error,
            c["delivery_attempts"],
            c["replay_count"],
            c["comment_id"],
            c["message_id"],
        )
        lines.append(" ".join(f"{_cell(v, w):<{w}}" for v, (_, w) in zip(cells, LIST_COLUMNS)) + " " + _cell(c["reason"], 80))
    return lines


def format_stats(stats: Stats, now: dt.datetime | None = None) -> list[str]:
    now = now or utc_now()
    if not stats.total:
        return ["no dead letters"]
    lines = [
        f"{stats.total} dead letter(s) ({', '.join(f'{n} {k}' for k, n in sorted(stats.by_kind.items()))}; "
        f"{stats.parked} parked)",
        f"oldest {rfc3339(stats.oldest)} ({format_age((now - stats.oldest).total_seconds())} ago), "  # type: ignore[operator]
        f"newest {rfc3339(stats.newest)} ({format_age((now - stats.newest).total_seconds())} ago)",  # type: ignore[operator]
        "",
        f"{'COUNT':>7} {'KIND':<6} {'STAGE':<8} {'ERROR TYPE':<22} {'OLDEST':>8} {'NEWEST':>8} PARKED",
    ]
    for g in stats.groups:
        lines.append(
            f"{g.count:>7} {g.kind:<6} {g.stage:<8} {_cell(g.error_type, 22):<22} "
            f"{format_age((now - g.oldest).total_seconds()):>8} {format_age((now - g.newest).total_seconds()):>8} {g.parked}"  # type: ignore[operator]
        )
        for reason, n in g.reasons.most_common(3):
            lines.append(f"{'':>7}   {n:>5} x {_cell(reason, 90)}")
        if len(g.reasons) > 3:
            lines.append(f"{'':>7}   ... {len(g.reasons) - 3} more distinct reason(s) (--json lists the top 10)")
    return lines


def format_letter(letter: Letter) -> list[str]:
    c = letter.classification()
    lines = [f"message {letter.message_id}"]
    for key in (
        "comment_id", "kind", "stage", "error_type", "reason", "delivery_attempts", "replay_count", "parked",
        "dead_lettered_at", "worker", "source_subscription", "source_message_id",
    ):
        lines.append(f"  {key + ':':<20} {'-' if c[key] is None else c[key]}")
    lines.append(f"  {'age:':<20} {format_age(c['age_s'])}")
    lines.append(f"  {'published:':<20} {rfc3339(letter.publish_time)}")
    lines.append(f"  {'ordering key:':<20} {letter.ordering_key or '-'}")
    lines.append("  attributes:")
    for k, v in sorted(letter.attributes.items()):
        lines.append(f"    {k} = {v}")
    record = letter.to_record()
    lines.append(f"  body ({len(letter.data)} bytes, {record['data_encoding']}):")
    lines.append("    " + _cell(record["data"], 2000))
    return lines
