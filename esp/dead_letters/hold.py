"""The hold subscription, with the lease of every pulled dead letter held until the command ends.

Pub/Sub has no peek. A scan pulls from the dead-letter hold subscription and holds what it pulled,
renewing the leases in the background, until it ends; then whatever was not acked is released
(nacked), which costs nothing because the hold subscription has no dead-letter policy of its own.
Nacking earlier would hand the same messages straight back to the next pull. A scan always ends:
when the subscription has returned nothing new for `pull_idle_s` (and `min_scan_s` has passed), at
`max_messages`, or after `max_scan_s` (Pub/Sub cannot tell which messages were there when a scan
began, so a steady trickle would otherwise keep it going for ever).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from esp.dead_letters.letters import Letter
from esp.pubsub import check_reachable, subscriber_client, translate_errors
from esp.settings import PubSubSettings
from esp.settings.dead_letters import DeadLetterSettings

log = logging.getLogger(__name__)

# Pub/Sub's limits: at most 1,000 messages per Pull; ack/modack requests are kept well under the
# 512 KB request limit at this many ack ids (an ack id is a few hundred bytes).
PULL_MAX = 1000
ACK_CHUNK = 1000
# A pull asks for about this many bytes' worth of messages, by the average size seen so far, so
# that large dead letters (up to 10 MB each) are pulled a few at a time.
PULL_BYTES_TARGET = 4 * 1024 * 1024
# Between two empty pulls, so an idle wait does not spin on the server.
EMPTY_PULL_PAUSE_S = 0.2
# One Pull call's deadline. An empty subscription holds a pull open and answers "nothing" shortly
# before the deadline (the emulator about a second before), so this bounds how long "idle" takes
# to notice; a pull of large messages gets more time for the transfer, at an assumed 4 MiB/s for
# up to a full response (Pub/Sub answers at most about 10 MB). A pull that still runs out of time
# may have been cut off mid-transfer, so it does not count as "nothing": the next pull gets twice
# the time, up to the maximum, and only an empty answer (or a timeout at the maximum) is idle.
PULL_TIMEOUT_S = 2.0
MAX_PULL_TIMEOUT_S = 16.0
PULL_BYTES_PER_S = 4 * 1024 * 1024
MAX_PULL_RESPONSE_BYTES = 10 * 1024 * 1024
# Acks are retried this many times, backing off, before the letters are reported as not acked.
ACK_ATTEMPTS = 3
ACK_BACKOFF_S = 0.5

# Why a scan ended.
STOP_IDLE, STOP_MAX, STOP_TIME = "idle", "max", "time"


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
        self.max_scan_s = dl_settings.max_scan_s
        self.path = settings.subscription_path(subscription or settings.dead_letter_subscription)
        self.client = subscriber_client(settings)
        self.scanned = 0
        self.stopped_by: str | None = None
        self._pulled_bytes = 0
        self._held: dict[str, str] = {}  # message_id -> ack_id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_leases, name="esp-dead-letter-leases", daemon=True)
        self._keeper.start()

    # -- pulling

    def scan(self, *, max_messages: int | None = None) -> Iterator[list[Letter]]:
        """Yields batches of newly pulled dead letters until the scan ends (see the module's
        docstring); `stopped_by` then says why. Every yielded letter stays leased."""
        idle_since = started = time.monotonic()
        slow = 1.0  # how much longer than planned pulls need: grows after a pull runs out of time
        cut_off = False
        while True:
            now = time.monotonic()
            if max_messages is not None and self.scanned >= max_messages:
                self.stopped_by = STOP_MAX
                return
            if now - started >= self.max_scan_s:
                self.stopped_by = STOP_TIME
                return
            if now - idle_since >= self.idle_s and now - started >= self.min_scan_s and not cut_off:
                self.stopped_by = STOP_IDLE
                return
            want = self._pull_size(max_messages)
            timeout = min(MAX_PULL_TIMEOUT_S, slow * self._pull_timeout(want))
            received = self._pull(want, timeout_s=timeout)
            cut_off = received is None and timeout < MAX_PULL_TIMEOUT_S
            if cut_off:
                slow *= 2
            fresh = self._hold(received or [])
            if fresh:
                # Only new messages count as activity: a redelivery of one already held is not.
                self.scanned += len(fresh)
                yield fresh
                # The time the caller spent on them (writing, republishing) is not idle time.
                idle_since = time.monotonic()
            elif not received:
                time.sleep(EMPTY_PULL_PAUSE_S)
            # Let this pull's messages go before the next one arrives (they can be 10 MB each).
            received = fresh = None

    def _pull_size(self, max_messages: int | None) -> int:
        want = PULL_MAX if max_messages is None else max(1, min(PULL_MAX, max_messages - self.scanned))
        if self.scanned:
            want = max(1, min(want, PULL_BYTES_TARGET // self._average_bytes()))
        return want

    def _average_bytes(self) -> int:
        return max(1, self._pulled_bytes // self.scanned) if self.scanned else 1

    def _pull_timeout(self, want: int) -> float:
        return PULL_TIMEOUT_S + min(want * self._average_bytes(), MAX_PULL_RESPONSE_BYTES) / PULL_BYTES_PER_S

    def _pull(self, want: int, *, timeout_s: float) -> list[Any] | None:
        """The messages one Pull returned; None when it ran out of time."""
        from google.api_core import exceptions as gexc

        try:
            resp = self.client.pull(
                request={"subscription": self.path, "max_messages": want}, timeout=timeout_s, retry=None
            )
        except gexc.DeadlineExceeded:
            return None
        return list(resp.received_messages)

    def _hold(self, received: Sequence[Any]) -> list[Letter]:
        if not received:
            return []
        fresh: list[Letter] = []
        with self._lock:
            for r in received:
                mid = r.message.message_id
                if mid not in self._held:
                    fresh.append(Letter.from_received(r))
                    self._pulled_bytes += len(r.message.data)
                # A redelivery of one we already hold (its lease lapsed): keep the newest lease only.
                self._held[mid] = r.ack_id
        # Set our own lease at once: if this process dies, the messages come back after lease_s,
        # not after the subscription's (possibly much longer) ack deadline.
        self._modack([r.ack_id for r in received], self.lease_s)
        return fresh

    # -- settling

    def ack(self, letters: Iterable[Letter]) -> int:
        """Acks (consumes) `letters`; returns how many could not be acked."""
        return self.ack_ids(x.message_id for x in letters)

    def ack_ids(self, message_ids: Iterable[str]) -> int:
        """Acks the held messages with these ids; returns how many could not be acked."""
        with self._lock:
            ack_ids = [ack for ack in (self._held.pop(mid, None) for mid in message_ids) if ack is not None]
        failed = 0
        for chunk in _chunks(ack_ids, ACK_CHUNK):
            for attempt in range(ACK_ATTEMPTS):
                try:
                    self.client.acknowledge(
                        request={"subscription": self.path, "ack_ids": chunk}, timeout=self.settings.pubsub_timeout_s
                    )
                    break
                except Exception as exc:  # any failure: retry, then report; the messages come back later
                    if attempt + 1 == ACK_ATTEMPTS:
                        log.error("acknowledging %d dead letter(s) failed %d times: %s", len(chunk), ACK_ATTEMPTS, exc)
                        failed += len(chunk)
                    else:
                        time.sleep(ACK_BACKOFF_S * 2**attempt)
        return failed

    def close(self) -> None:
        """Stops renewing leases and releases everything still held."""
        self._stop.set()
        self._keeper.join(timeout=5)
        with self._lock:
            ack_ids = list(self._held.values())
            self._held.clear()
        try:
            if ack_ids:
                self._modack(ack_ids, 0)
        finally:
            self.client.close()

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


@contextlib.contextmanager
def holding(
    settings: PubSubSettings, dl_settings: DeadLetterSettings, doing: str, *, subscription: str | None = None
) -> Iterator[HoldSession]:
    """A HoldSession for one command: checks the emulator is there, turns Pub/Sub errors into
    one-line EspErrors that say what was being done, and releases what is still held at the end."""
    check_reachable(settings)
    with translate_errors(settings, f"{doing} {subscription or settings.dead_letter_subscription}"):
        session = HoldSession(settings, dl_settings, subscription=subscription)
        try:
            yield session
        finally:
            session.close()


def scan_note(session: HoldSession, max_messages: int | None, max_scan_s: float) -> str:
    """How much a scan saw, and whether it stopped before the subscription ran dry."""
    note = f"{session.scanned} scanned"
    if session.stopped_by == STOP_MAX:
        note += f", stopped at --max {max_messages} (there may be more)"
    elif session.stopped_by == STOP_TIME:
        note += f", stopped after --max-scan-s {max_scan_s:g} (there may be more; run it again)"
    return note


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])
