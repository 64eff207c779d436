"""Sentence spans for Perspective's `spanAnnotations`, with offsets in UTF-16 code units.

Perspective scores spans "at per-sentence level", and its SpanScore's `begin`/`end` are UTF-16
offsets ("end" exclusive), because its clients are often JavaScript, whose strings index that way.
Python indexes by code point, so every character outside the Basic Multilingual Plane (an emoji)
shifts the UTF-16 offset by one more; `Span` carries both.

A sentence ends at `.`, `!`, `?` or `…` (any run of them, with closing quotes or brackets) followed
by whitespace, or at a line break. Surrounding whitespace is not part of a span.
"""

from __future__ import annotations

import dataclasses
import re

# End of a sentence: terminal punctuation (and closers) then whitespace, or a line break.
_BOUNDARY = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n+")


@dataclasses.dataclass(frozen=True)
class Span:
    start: int  # code-point offsets into the Python str (for slicing)
    stop: int
    begin: int  # UTF-16 offsets (for the wire)
    end: int


def utf16_len(text: str) -> int:
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def sentence_spans(text: str) -> list[Span]:
    """The sentences of `text`, in order, without surrounding whitespace; none for blank text."""
    pieces: list[tuple[int, int]] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        # Closing quotes belong to the sentence they close, the whitespace to neither.
        _add(pieces, text, start, match.start() + len(match.group(0).rstrip()))
        start = match.end()
    _add(pieces, text, start, len(text))
    return _with_utf16(text, pieces)


def _add(pieces: list[tuple[int, int]], text: str, start: int, stop: int) -> None:
    while start < stop and text[start].isspace():
        start += 1
    while stop > start and text[stop - 1].isspace():
        stop -= 1
    if stop > start:
        pieces.append((start, stop))


def _with_utf16(text: str, pieces: list[tuple[int, int]]) -> list[Span]:
    spans = []
    extra = 0  # astral characters seen before `pos`
    pos = 0
    for start, stop in pieces:
        extra += _astral(text, pos, start)
        begin = start + extra
        extra += _astral(text, start, stop)
        spans.append(Span(start, stop, begin, stop + extra))
        pos = stop
    return spans


def _astral(text: str, start: int, stop: int) -> int:
    return sum(1 for i in range(start, stop) if ord(text[i]) > 0xFFFF)
