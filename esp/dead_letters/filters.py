"""Which dead letters a command acts on: stage, error type, reason, kind, time window, ids, parked."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

from esp.contracts import as_utc, rfc3339, utc_now
from esp.dead_letters.letters import Letter

PARKED_ANY, PARKED_EXCLUDE, PARKED_ONLY = "include", "exclude", "only"

_DURATION = re.compile(r"(\d{1,12}(?:\.\d{1,6})?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time: ISO-8601 (`2024-05-01T12:00Z`, naive means UTC) or an age (`90m`, `2h`, `3d`)."""
    value = value.strip()
    wrong = f"{value[:60]!r} is neither an ISO-8601 time nor an age such as 30m, 2h or 3d"
    m = _DURATION.fullmatch(value)
    try:
        if m:
            return (now or utc_now()) - dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
        t = as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (ValueError, OverflowError):
        raise ValueError(wrong) from None
    if t is None:
        raise ValueError(wrong)
    return t


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
        return self.matches_ignoring_parked(letter)

    def matches_ignoring_parked(self, letter: Letter) -> bool:
        d = letter.dead_letter
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
