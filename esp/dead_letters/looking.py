"""Looking without consuming: stats, list and show.

Every letter is released at the end of the scan. What a command keeps of each matching letter is
its own choice (a classification row for list, counters for stats), so memory follows what is
shown, not the size of the bodies scanned.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from esp.contracts import rfc3339
from esp.dead_letters.filters import Filter
from esp.dead_letters.hold import STOP_IDLE, holding, scan_note
from esp.dead_letters.letters import Letter
from esp.settings import PubSubSettings
from esp.settings.dead_letters import DeadLetterSettings

T = TypeVar("T")
# Distinct reasons counted per group; the rest are counted together, so hostile reasons (each one
# different) cannot grow a stats run without bound.
MAX_REASONS_PER_GROUP = 1000
OTHER_REASONS = "(other reasons)"


@dataclasses.dataclass
class Looked(Generic[T]):
    items: list[T]  # what the command kept of each matching letter, in pull order
    scanned: int
    note: str  # how far the scan went (scan_note)
    complete: bool  # the scan ran until the subscription was idle, not stopped by --max or --max-scan-s


def look(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    keep: Callable[[Letter], T | None],
    *,
    max_messages: int | None,
    subscription: str | None = None,
) -> Looked[T]:
    """Scans without consuming anything and keeps `keep(letter)` of each matching letter (None: nothing)."""
    items: list[T] = []
    with holding(settings, dl_settings, "reading dead letters from", subscription=subscription) as session:
        for batch in session.scan(max_messages=max_messages):
            for letter in batch:
                if flt.matches(letter):
                    kept = keep(letter)
                    if kept is not None:
                        items.append(kept)
        note = scan_note(session, max_messages, dl_settings.max_scan_s)
        return Looked(items, session.scanned, note, session.stopped_by == STOP_IDLE)


def peek(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    *,
    max_messages: int | None,
    subscription: str | None = None,
) -> Looked[Letter]:
    """The matching letters themselves (bodies included), oldest first; for `show` and tests."""
    found = look(settings, dl_settings, flt, lambda x: x, max_messages=max_messages, subscription=subscription)
    found.items.sort(key=lambda x: x.failed_at)
    return found


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
        reason = letter.dead_letter.reason
        if reason not in self.reasons and len(self.reasons) >= MAX_REASONS_PER_GROUP:
            reason = OTHER_REASONS
        self.reasons[reason] += 1

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


# Distinct (kind, stage, error type) groups kept; further ones are counted in one "other" group.
MAX_GROUPS = 1000


@dataclasses.dataclass
class Stats:
    """Counts grouped by kind, stage and error type (each group with its reasons), fed one letter at a time."""

    total: int = 0
    parked: int = 0
    not_whole: int = 0  # letters that could not keep the body whole (esp_kept)
    oldest: dt.datetime | None = None
    newest: dt.datetime | None = None
    by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_group: dict[tuple[str, str, str], Group] = dataclasses.field(default_factory=dict)

    def add(self, letter: Letter) -> None:
        d = letter.dead_letter
        self.total += 1
        self.parked += d.parked
        self.not_whole += not d.replayable
        t = letter.failed_at
        self.oldest = t if self.oldest is None or t < self.oldest else self.oldest
        self.newest = t if self.newest is None or t > self.newest else self.newest
        self.by_kind[d.kind] += 1
        key = (d.kind, d.stage, d.error_type)
        if key not in self.by_group and len(self.by_group) >= MAX_GROUPS:
            key = (d.kind, "other", "other")
        self.by_group.setdefault(key, Group(*key)).add(letter)

    @property
    def groups(self) -> list[Group]:
        """Largest first."""
        return sorted(self.by_group.values(), key=lambda g: (-g.count, g.stage, g.error_type))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "parked": self.parked,
            "not_whole": self.not_whole,
            "oldest": rfc3339(self.oldest) if self.oldest else None,
            "newest": rfc3339(self.newest) if self.newest else None,
            "by_kind": dict(self.by_kind),
            "groups": [g.to_dict() for g in self.groups],
        }

