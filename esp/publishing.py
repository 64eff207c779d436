"""`esp publish`: comments from JSONL or CSV (a file, gzipped or not, or stdin) onto the comments topic.

Rows are validated with the comment contract before anything is sent; a row that breaks it is
reported with its line number and never published. Publishing is batched by the client library,
bounded by its flow control, and counted as futures complete, so the summary is what Pub/Sub
confirmed, not what was handed over.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from esp.contracts import AmbiguousJson, Comment, InvalidComment, comment_from_fields, loads_json
from esp.errors import ConfigError, EspError
from esp.pubsub import check_reachable, publisher_client, where
from esp.settings import CommentSettings, PubSubSettings

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "csv")
# Tried in order when --text-column is not given: ESP's own name, then Jigsaw's.
TEXT_COLUMN_FALLBACKS = ("text", "comment_text")


@dataclasses.dataclass(frozen=True)
class Row:
    line: int
    comment: Comment | None
    error: str | None = None


@dataclasses.dataclass
class PublishSummary:
    published: int = 0
    rejected: int = 0
    failed: int = 0
    seconds: float = 0.0
    rejections: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rejected == 0 and self.failed == 0

    def line(self) -> str:
        rate = self.published / self.seconds if self.seconds > 0 else 0.0
        return (
            f"published {self.published}, rejected {self.rejected}, failed {self.failed} "
            f"in {self.seconds:.1f}s ({rate:,.0f} messages/s)"
        )


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")) or path == "-":
        return "jsonl"
    raise ConfigError(f"cannot tell the format of {path!r} from its name; pass --format jsonl or --format csv")


def open_text(path: str) -> IO[str]:
    """Opens a path (or '-' for stdin) as UTF-8 text, transparently gunzipping *.gz.

    Invalid bytes are kept as surrogate escapes rather than raised while decoding a whole chunk,
    so the one bad row can be rejected with its own line number (`_utf8_error`). A byte order mark
    at the very start (spreadsheet programs write one) marks the encoding and is dropped.
    """
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such file: {path}")
    if path.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(p, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _utf8_error(*values: str) -> str | None:
    """The reason when a decoded value still holds surrogate escapes, i.e. came from invalid UTF-8."""
    for value in values:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"invalid_utf8: not valid UTF-8 at character {exc.start + 1}"
    return None


def read_rows(
    stream: IO[str], fmt: str, *, id_column: str, text_column: str | None, max_body_bytes: int
) -> Iterator[Row]:
    """Yields each input row as a valid Comment or with the reason it breaks the contract.

    A row never raises: whatever is wrong with it is its rejection's reason. A file that cannot be
    read on (a truncated gzip, a read error) or a CSV header without the columns raises EspError.
    """
    if fmt == "jsonl":
        rows = _read_jsonl(stream, id_column, text_column or "text", max_body_bytes)
    else:
        rows = _read_csv(stream, id_column, text_column, max_body_bytes)
    last = 0
    try:
        for row in rows:
            last = row.line
            yield row
    except (OSError, EOFError, zlib.error) as exc:
        raise EspError(f"reading stopped after line {last}: {exc}") from None


def _validated(line: int, cid: Any, text: Any, max_body_bytes: int) -> Row:
    bad_utf8 = _utf8_error(*(v for v in (cid, text) if isinstance(v, str)))
    if bad_utf8:
        return Row(line, None, bad_utf8)
    try:
        return Row(line, comment_from_fields(cid, text, max_body_bytes=max_body_bytes))
    except InvalidComment as exc:
        return Row(line, None, f"{exc.error_type}: {exc.reason}")
    except Exception as exc:  # one odd row is rejected with the reason; it never stops the file
        return Row(line, None, f"invalid_row: {type(exc).__name__}: {exc}")


def _read_jsonl(stream: IO[str], id_field: str, text_field: str, max_body_bytes: int) -> Iterator[Row]:
    for lineno, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        bad_utf8 = _utf8_error(raw)
        if bad_utf8:
            yield Row(lineno, None, bad_utf8)
            continue
        try:
            obj = loads_json(raw)
        except AmbiguousJson as exc:
            yield Row(lineno, None, f"invalid_json: ambiguous JSON: {exc}")
            continue
        except json.JSONDecodeError as exc:
            yield Row(lineno, None, f"invalid_json: {exc.msg} at column {exc.colno}")
            continue
        except (ValueError, RecursionError) as exc:
            # Valid JSON Python will not hold: an integer of over 4,300 digits, nesting too deep.
            yield Row(lineno, None, f"invalid_json: {exc or type(exc).__name__}")
            continue
        if not isinstance(obj, dict):
            yield Row(lineno, None, f"not_an_object: expected a JSON object, got {type(obj).__name__}")
            continue
        yield _validated(lineno, obj.get(id_field), obj.get(text_field), max_body_bytes)


def _read_csv(stream: IO[str], id_column: str, text_column: str | None, max_body_bytes: int) -> Iterator[Row]:
    # A field too long to be a comment is read whole and rejected as its row. Only one past this
    # bound stops the file: the reader cannot tell where such a field ends, and restarting mid-field
    # would read its lines as rows of their own, with ids and texts the field's author chose.
    csv.field_size_limit(max(csv.field_size_limit(), 4 * max_body_bytes))
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise EspError(f"cannot read the CSV header: {exc}") from None
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMN_FALLBACKS if c in header), TEXT_COLUMN_FALLBACKS[0])
    missing = [c for c in (id_column, text_column) if c not in header]
    if missing:
        raise ConfigError(
            f"CSV header has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)}); "
            "use --id-column/--text-column"
        )
    id_i, text_i = header.index(id_column), header.index(text_column)
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise EspError(f"reading stopped at line {start}: {exc}; nothing after it was read") from None
        if not fields:
            continue
        if len(fields) != len(header):
            yield Row(start, None, f"invalid_csv: {len(fields)} fields, the header has {len(header)}")
            continue
        bad_utf8 = _utf8_error(fields[id_i], fields[text_i])
        if bad_utf8:
            yield Row(start, None, bad_utf8)
            continue
        yield _validated(start, fields[id_i], fields[text_i], max_body_bytes)


def publish_file(
    path: str,
    *,
    pubsub: PubSubSettings,
    comments: CommentSettings,
    fmt: str = "auto",
    id_column: str = "id",
    text_column: str | None = None,
    attributes: dict[str, str] | None = None,
    max_outstanding_messages: int = 10_000,
    max_outstanding_bytes: int = 64 * 1024 * 1024,
    progress: bool = True,
) -> PublishSummary:
    """Publishes every valid row of `path` to the comments topic and reports what happened."""
    from google.cloud.pubsub_v1 import types

    fmt = detect_format(path, fmt)
    stream = open_text(path)  # before connecting: a wrong path is the likelier mistake
    try:
        check_reachable(pubsub)
    except EspError:
        stream.close()
        raise
    summary = PublishSummary()
    lock = threading.Lock()
    topic = pubsub.topic_path(pubsub.comments_topic)
    client = publisher_client(
        pubsub,
        # Larger batches than the defaults (100 messages / 10 ms): a file is a bulk load.
        batch_settings=types.BatchSettings(max_messages=1000, max_bytes=4 * 1024 * 1024, max_latency=0.05),
        publisher_options=types.PublisherOptions(
            flow_control=types.PublishFlowControl(
                message_limit=max_outstanding_messages,
                byte_limit=max_outstanding_bytes,
                limit_exceeded_behavior=types.LimitExceededBehavior.BLOCK,
            )
        ),
    )
    bar = _progress_bar(path, enabled=progress)

    def done(future: Any, line: int) -> None:
        exc = future.exception()
        with lock:
            if exc is None:
                summary.published += 1
            else:
                summary.failed += 1
                if len(summary.failures) < 20:
                    summary.failures.append(f"line {line}: {exc}")
        bar.update(1)

    started = time.monotonic()
    futures = []
    try:
        with stream:
            for row in read_rows(
                stream, fmt, id_column=id_column, text_column=text_column, max_body_bytes=comments.max_body_bytes
            ):
                if row.comment is None:
                    summary.rejected += 1
                    summary.rejections.append((row.line, row.error or ""))
                    bar.update(1)
                    continue
                future = client.publish(topic, row.comment.to_json_bytes(), **(attributes or {}))
                future.add_done_callback(lambda f, line=row.line: done(f, line))
                futures.append(future)
        wait_s = pubsub.pubsub_timeout_s + 60
        for future in futures:
            # Waits for Pub/Sub's answer; done() already counted it, a failure included.
            try:
                future.exception(timeout=wait_s)
            except TimeoutError:
                raise EspError(
                    f"publishing to {pubsub.comments_topic}: no answer from {where(pubsub)} within {wait_s:g}s"
                ) from None
    finally:
        client.stop()
        bar.close()
        summary.seconds = time.monotonic() - started
    return summary


def _progress_bar(path: str, *, enabled: bool) -> Any:
    from tqdm import tqdm

    name = Path(path).name if path != "-" else "stdin"
    return tqdm(desc=f"publishing {name}", unit=" msgs", file=sys.stderr, disable=not enabled)
