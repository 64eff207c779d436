"""What the worker holds: every pulled, not yet settled message, its lease, and the flow-control bounds.

Pulling in batches ourselves (unary Pull, 10x the streaming-pull callback's rate on the emulator)
means the worker owns two things the streaming client would have done: extending each message's
ack deadline before it runs out, so slow scoring or an outage does not cause redeliveries
(python-pubsub issue 593), and bounding what is held, in messages and bytes, so memory stays flat
whatever the backlog (google-cloud-python issues 4792/7677). A message counts its whole size
(`PubsubMessage.ByteSize()`: body, attribute keys and values, ordering key), since a producer can
put ~100 KB of attributes next to a 30-byte body. The bound is checked before each Pull, and a Pull
asks for no more messages than fit in the room left at the mean size seen so far; so held bytes
stay under max_bytes plus one Pull's response: with even sizes about one message more, and at
worst, when a Pull meets messages much larger than the mean, max_messages-per-pull of them (Pub/Sub
documents no cap on a Pull response's size). A message leaves the ledger exactly
once, when it is acked or nacked; a second settle is refused, so a late publish confirmation can
never ack a message shutdown already nacked. Time is passed in; thread-safe.
"""

from __future__ import annotations

import dataclasses
import math
import threading


@dataclasses.dataclass
class _Lease:
    size_bytes: int
    received_at: float
    expires_at: float
    lease_s: float


class Ledger:
    def __init__(
        self,
        *,
        max_messages: int,
        max_bytes: int,
        extension_s: float,
        margin_s: float,
        max_lease_duration_s: float,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be positive")
        if not 0 < margin_s < extension_s:
            raise ValueError("margin_s must be positive and below extension_s")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.extension_s = extension_s
        self.margin_s = margin_s
        self.max_lease_duration_s = max_lease_duration_s
        self._held: dict[str, _Lease] = {}
        self._bytes = 0
        self._mean_size = 0.0  # of the messages held so far, weighted to recent pulls; 0 before any
        # The most ever held at once, by count and by bytes: the flow-control bound's own record
        # (the flow-control tests read it; a sampler would miss a brief overshoot).
        self.peak_count = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    # ---- flow control

    @property
    def count(self) -> int:
        return len(self._held)

    @property
    def bytes(self) -> int:
        return self._bytes

    def room(self) -> int:
        """How many messages may be pulled now: 0 once either bound is reached, and no more than fit
        in the bytes left at the mean message size seen so far (at least one)."""
        with self._lock:
            return self._room_locked()

    def _room_locked(self) -> int:
        if self._bytes >= self.max_bytes:
            return 0
        room = max(0, self.max_messages - len(self._held))
        if self._mean_size > 0:
            room = min(room, max(1, math.ceil((self.max_bytes - self._bytes) / self._mean_size)))
        return room

    def wait_for_room(self, timeout_s: float) -> int:
        """Blocks until there is room (or the timeout); returns the room."""
        with self._room:
            if self._room_locked() == 0:
                self._room.wait(timeout_s)
            return self._room_locked()

    # ---- the ledger

    def hold(self, ack_id: str, size_bytes: int, now: float, lease_s: float) -> None:
        """Records a pulled message whose current ack deadline is `lease_s` from `now`."""
        self.hold_many([(ack_id, size_bytes)], now, lease_s)

    def hold_many(self, messages: list[tuple[str, int]], now: float, lease_s: float) -> None:
        """`hold` for (ack_id, size) pairs under one lock."""
        with self._lock:
            for ack_id, size_bytes in messages:
                if ack_id not in self._held:
                    self._held[ack_id] = _Lease(size_bytes, now, now + lease_s, lease_s)
                    self._bytes += size_bytes
            self.peak_count = max(self.peak_count, len(self._held))
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            if messages:
                pulled = sum(size for _, size in messages) / len(messages)
                self._mean_size = pulled if self._mean_size == 0 else (self._mean_size + pulled) / 2

    def settle(self, ack_id: str) -> bool:
        """Removes a message that is being acked or nacked; False when it was not held (any more)."""
        with self._lock:
            lease = self._held.pop(ack_id, None)
            if lease is None:
                return False
            self._bytes -= lease.size_bytes
            self._room.notify_all()
            return True

    def settle_many(self, ack_ids: list[str]) -> list[str]:
        """`settle` for many under one lock; returns those that were held."""
        settled = []
        with self._lock:
            for ack_id in ack_ids:
                lease = self._held.pop(ack_id, None)
                if lease is not None:
                    self._bytes -= lease.size_bytes
                    settled.append(ack_id)
            if settled:
                self._room.notify_all()
        return settled

    def holds(self, ack_id: str) -> bool:
        with self._lock:
            return ack_id in self._held

    def all_held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    # ---- leases

    def _margin(self, lease: _Lease) -> float:
        # A short lease (a 10 s ack deadline) is renewed half-way, a long one `margin_s` before its end.
        return min(self.margin_s, lease.lease_s / 2)

    def due_for_extension(self, now: float) -> list[str]:
        """Ack ids whose lease ends within its margin and may still be extended.

        Nothing is recorded here: a lease counts as extended only once Pub/Sub confirmed it
        (`extended`), so a failed call leaves the message due and it is retried at the next check,
        while its old lease still runs. Messages held longer than `max_lease_duration_s` are no
        longer extended: Pub/Sub redelivers them, so a stuck worker cannot hold a message forever.
        They stay in the ledger (and count against flow control) until they are settled.
        """
        with self._lock:
            return [
                ack_id
                for ack_id, lease in self._held.items()
                if now >= lease.expires_at - self._margin(lease) and now - lease.received_at < self.max_lease_duration_s
            ]

    def extended(self, ack_ids: list[str], now: float) -> None:
        """Records leases Pub/Sub confirmed extended at `now` to `extension_s`."""
        with self._lock:
            for ack_id in ack_ids:
                lease = self._held.get(ack_id)
                if lease is not None:
                    lease.expires_at = now + self.extension_s
                    lease.lease_s = self.extension_s

    def expiring(self, now: float) -> int:
        """How many held leases have already run out (Pub/Sub may have redelivered them)."""
        with self._lock:
            return sum(1 for lease in self._held.values() if lease.expires_at <= now)
