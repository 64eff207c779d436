"""Export: matching dead letters to a JSONL file, streamed to disk, optionally consumed after.

Each record is written as its letter is pulled, so memory holds one pull's worth of letters, not
the export: the file is the only place the bodies accumulate. It is written to a temporary name
beside the target, fsynced and renamed into place, so a reader (or a crash) sees either no file or
the complete one; with `consume`, the exported letters are acked only after that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from esp.dead_letters.filters import Filter
from esp.dead_letters.hold import holding, scan_note
from esp.errors import EspError
from esp.settings import PubSubSettings
from esp.settings.dead_letters import DeadLetterSettings


@dataclasses.dataclass
class ExportResult:
    path: Path
    scanned: int = 0
    written: int = 0
    acked: int = 0
    ack_failed: int = 0
    note: str = ""


@contextlib.contextmanager
def atomic_jsonl(path: Path) -> Iterator[IO[str]]:
    """A text file that replaces `path` only when the block ends normally: written beside it under a
    temporary name, fsynced, renamed over `path`, then the directory fsynced."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
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


def write_record(f: IO[str], record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False, sort_keys=True))
    f.write("\n")


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
    """Writes the matching dead letters to `path` as JSONL, in the order they are pulled; with
    `consume`, acks them only after the file is safely on disk (fsynced and renamed into place)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise EspError(f"{path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise EspError(f"directory {path.parent} does not exist")
    result = ExportResult(path)
    written: list[str] = []  # message ids only: the bodies are on disk, not here
    with holding(settings, dl_settings, "exporting dead letters from") as session:
        try:
            with atomic_jsonl(path) as f:
                for batch in session.scan(max_messages=max_messages):
                    for letter in batch:
                        if flt.matches(letter):
                            write_record(f, letter.to_record())
                            written.append(letter.message_id)
        except OSError as exc:
            raise EspError(f"writing {path} failed: {exc.strerror or exc}; nothing was consumed") from None
        result.scanned, result.written = session.scanned, len(written)
        result.note = scan_note(session, max_messages, dl_settings.max_scan_s)
        if consume:
            result.ack_failed = session.ack_ids(written)
            result.acked = len(written) - result.ack_failed
    return result
