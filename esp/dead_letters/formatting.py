"""Dead letters for people: the tables of stats and list, and the full view of show.

Bodies, attributes and reasons are whatever a producer sent. Anything that is not a printable
character (control characters, terminal escape sequences, bidi overrides, lone surrogates) is shown
escaped, so a letter cannot rewrite the operator's terminal or hide in it.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from typing import Any

from esp.contracts import rfc3339, utc_now
from esp.dead_letters.letters import Letter
from esp.dead_letters.looking import Stats

SHOW_BODY_CHARS = 2000


def printable(text: str) -> str:
    """`text` with every non-printable character escaped as Python would write it (\\x1b, \\u202e)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    # Cut before escaping (bounded work on a huge value), then again to the width.
    text = printable(text[: width * 2])
    return text if len(text) <= width else text[: width - 1] + "…"


LIST_COLUMNS = (
    ("AGE", 8),
    ("KIND", 7),
    ("STAGE", 8),
    ("ERROR TYPE", 30),
    ("TRIES", 5),
    ("REPLAYS", 7),
    ("ID", 24),
    ("MESSAGE ID", 18),
)


def format_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`rows` are classifications (Letter.classification), in the order to show them."""
    header = " ".join(f"{name:<{w}}" for name, w in LIST_COLUMNS) + " REASON"
    lines = [header]
    for c in rows:
        marks = (" [parked]" if c["parked"] else "") + (f" [{c['kept']}]" if c["kept"] != "whole" else "")
        cells = (
            format_age(c["age_s"]),
            c["kind"],
            c["stage"],
            c["error_type"] + marks,
            c["delivery_attempts"],
            c["replay_count"],
            c["comment_id"],
            c["message_id"],
        )
        lines.append(" ".join(f"{_cell(v, w):<{w}}" for v, (_, w) in zip(cells, LIST_COLUMNS)) + " " + _cell(c["reason"], 80))
    return lines


def _ago(now: dt.datetime, then: dt.datetime | None) -> str:
    return "-" if then is None else format_age((now - then).total_seconds())


def format_stats(stats: Stats, now: dt.datetime | None = None) -> list[str]:
    now = now or utc_now()
    if not stats.total or stats.oldest is None or stats.newest is None:
        return ["no dead letters"]
    kinds = ", ".join(f"{n} {_cell(k, 20)}" for k, n in sorted(stats.by_kind.items()))
    head = f"{stats.total} dead letter(s) ({kinds}; {stats.parked} parked"
    if stats.not_whole:
        head += f"; {stats.not_whole} not holding the body whole, cannot be replayed"
    lines = [
        head + ")",
        f"oldest {rfc3339(stats.oldest)} ({_ago(now, stats.oldest)} ago), newest {rfc3339(stats.newest)} ({_ago(now, stats.newest)} ago)",
        "",
        f"{'COUNT':>7} {'KIND':<7} {'STAGE':<8} {'ERROR TYPE':<22} {'OLDEST':>8} {'NEWEST':>8} PARKED",
    ]
    for g in stats.groups:
        lines.append(
            f"{g.count:>7} {_cell(g.kind, 7):<7} {_cell(g.stage, 8):<8} {_cell(g.error_type, 22):<22} "
            f"{_ago(now, g.oldest):>8} {_ago(now, g.newest):>8} {g.parked}"
        )
        for reason, n in g.reasons.most_common(3):
            lines.append(f"{'':>7}   {n:>5} x {_cell(reason, 90)}")
        if len(g.reasons) > 3:
            lines.append(f"{'':>7}   ... {len(g.reasons) - 3} more distinct reason(s) (--json lists the top 10)")
    return lines


def format_letter(letter: Letter) -> list[str]:
    c = letter.classification()
    d = letter.dead_letter
    lines = [f"message {printable(letter.message_id)}"]
    for key in (
        "comment_id", "kind", "stage", "error_type", "reason", "delivery_attempts", "replay_count", "parked",
        "kept", "dead_lettered_at", "worker", "source_subscription", "source_message_id",
    ):  # fmt: skip
        lines.append(f"  {key + ':':<20} {'-' if c[key] is None else printable(str(c[key]))}")
    lines.append(f"  {'age:':<20} {format_age(c['age_s'])}")
    lines.append(f"  {'published:':<20} {rfc3339(letter.publish_time)}")
    lines.append(f"  {'ordering key:':<20} {printable(letter.ordering_key) or '-'}")
    note = d.kept_note()
    if note:
        lines.append(f"  {'NOTE:':<20} {note}")
    lines.append("  original attributes (what a replay republishes):")
    for k, v in sorted(d.attributes.items()):
        lines.append(f"    {printable(k)} = {printable(v)}")
    lines.append("  dead-letter attributes (as received):")
    for k, v in sorted(letter.attributes.items()):
        lines.append(f"    {printable(k)} = {printable(v)}")
    try:
        text, encoding = letter.body.decode("utf-8"), "utf-8"
        shown, cut = text[:SHOW_BODY_CHARS], len(text) > SHOW_BODY_CHARS
    except UnicodeDecodeError:
        head = letter.body[: SHOW_BODY_CHARS // 4 * 3]
        shown, encoding, cut = base64.b64encode(head).decode("ascii"), "base64", len(letter.body) > len(head)
    more = f", first {SHOW_BODY_CHARS} characters" if cut else ""
    lines.append(f"  body ({len(letter.body)} bytes, {encoding}{more}):")
    lines.append("    " + printable(shown))
    return lines
