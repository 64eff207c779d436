"""Purge: ack (discard for good) the matching dead letters; the rest are released untouched."""

from __future__ import annotations

import dataclasses

from esp.dead_letters.filters import Filter
from esp.dead_letters.hold import holding, scan_note
from esp.settings import PubSubSettings
from esp.settings.dead_letters import DeadLetterSettings


@dataclasses.dataclass
class PurgeResult:
    dry_run: bool
    scanned: int = 0
    matched: int = 0
    purged: int = 0
    ack_failed: int = 0
    limit_reached: bool = False
    note: str = ""


def purge(
    settings: PubSubSettings,
    dl_settings: DeadLetterSettings,
    flt: Filter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    max_messages: int | None = None,
) -> PurgeResult:
    """Acks the matching dead letters, batch by batch as they are pulled (not with `dry_run`)."""
    result = PurgeResult(dry_run=dry_run)
    with holding(settings, dl_settings, "purging dead letters from") as session:
        for batch in session.scan(max_messages=max_messages):
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
        result.scanned = session.scanned
        result.note = scan_note(session, max_messages, dl_settings.max_scan_s)
    return result
