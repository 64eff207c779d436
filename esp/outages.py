"""Why a process is paused: the outages it is waiting out, by cause, shared by its threads.

An outage is a service ESP depends on failing (the model server, a topic), never a message's
fault. Whoever meets one calls `begin(cause, reason)` and, once its call goes through, `end(cause)`;
several threads may be in the same outage at once (every batch in flight meets a dead model server),
so each cause is counted. While any cause is open, `paused()` is true: the worker stops pulling
(messages not yet pulled spend no delivery attempt) and /readyz says why. Edges are logged once
and counted in metrics, so an on-call engineer sees when, why and for how long.

Edges are reported (logged, `on_change`, `on_resolved`) in the order they happened, one at a time:
each is queued under the lock that changed the state, and whichever thread finds no report running
delivers the queue. So a thread descheduled after opening an outage cannot report "open" after
another thread reported it closed (the worker's `esp_paused` gauge would say 1 on a healthy
worker), and no caller waits on another's callback. A report may reach the callbacks a moment
after `begin`/`end` returned, from another thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MODEL = "model server"
SCORES_TOPIC = "scores topic"
DEAD_LETTER_TOPIC = "dead-letter topic"
PUBSUB = "Pub/Sub"
CAUSES = (MODEL, SCORES_TOPIC, DEAD_LETTER_TOPIC, PUBSUB)


class Outages:
    def __init__(
        self,
        *,
        on_change: Callable[[str, bool], None] | None = None,
        on_resolved: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_change(cause, open)` is called on each edge; `on_resolved(cause, seconds)` when one ends."""
        self._on_change = on_change
        self._on_resolved = on_resolved
        self._clock = clock
        self._cond = threading.Condition()
        self._open: dict[str, list] = {}  # cause -> [count, reason, since]
        # Edges not yet reported, in order: (cause, reason) for an opening, (cause, seconds) for an end.
        self._edges: collections.deque[tuple[bool, str, str | float]] = collections.deque()
        self._reporting = threading.Lock()  # held by the one thread delivering edges

    def begin(self, cause: str, reason: str) -> None:
        with self._cond:
            entry = self._open.get(cause)
            if entry is not None:
                entry[0] += 1
                entry[1] = reason
                return
            self._open[cause] = [1, reason, self._clock()]
            self._edges.append((True, cause, reason))
        self._report()

    def update(self, cause: str, reason: str) -> None:
        """A newer reason for an outage this caller is already in."""
        with self._cond:
            if cause in self._open:
                self._open[cause][1] = reason

    def end(self, cause: str) -> None:
        with self._cond:
            entry = self._open.get(cause)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del self._open[cause]
            self._edges.append((False, cause, self._clock() - entry[2]))
            self._cond.notify_all()
        self._report()

    def _report(self) -> None:
        """Delivers queued edges in order, unless another thread is delivering (it will deliver ours)."""
        while True:
            if not self._reporting.acquire(blocking=False):
                return  # the holder checks the queue again after releasing: our edge is not stranded
            try:
                while True:
                    with self._cond:
                        if not self._edges:
                            break
                        opened, cause, detail = self._edges.popleft()
                    self._deliver(opened, cause, detail)
            finally:
                self._reporting.release()
            with self._cond:
                if not self._edges:
                    return

    def _deliver(self, opened: bool, cause: str, detail: str | float) -> None:
        if opened:
            log.warning("%s unavailable, pausing: %s", cause, detail)
        else:
            log.warning("%s answers again after %.1fs; resuming", cause, detail)
        if self._on_change is not None:
            self._on_change(cause, opened)
        if not opened and self._on_resolved is not None:
            self._on_resolved(cause, float(detail))

    def paused(self) -> bool:
        with self._cond:
            return bool(self._open)

    def is_open(self, cause: str) -> bool:
        with self._cond:
            return cause in self._open

    def describe(self) -> str | None:
        """None when nothing is paused, else one line naming every open outage and its reason."""
        with self._cond:
            if not self._open:
                return None
            now = self._clock()
            parts = [f"{cause} unavailable for {now - since:.0f}s: {reason}" for cause, (_, reason, since) in self._open.items()]
        return "paused: " + "; ".join(parts)

    def wait_until_clear(self, timeout_s: float) -> bool:
        """Blocks while any outage is open (or until the timeout); True when none is."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._open, timeout=timeout_s)
