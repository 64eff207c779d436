"""Training-data preparation: labelled CSV/JSONL in, cleaned, deduplicated, split TFRecords out.

    files (local or gs:// globs) -> parse whole files (CSV fields may hold newlines) -> normalise
    -> reject (with reason) | keep -> dedupe by normalised text -> split by a hash of the id
    -> <out>/{train,dev,test}-SSSSS-of-NNNNN.tfrecord, <out>/rejects-*.jsonl, <out>/stats.json

Dedupe: rows whose normalised, case-folded text is equal are one comment (the model is uncased,
so they are the same input). The survivor keeps the smallest id, and each label is the maximum
over the copies: a comment any copy marks toxic stays toxic, the cautious choice for moderation.
Such conflicts are counted in the stats.

Split: sha256 of the (surviving) id, read as a number in [0, 1), against the cumulative ratios.
It depends on nothing but the id, so a comment lands in the same split on every run and machine,
and adding rows never moves existing ones.

Run with the DirectRunner locally (always passed explicitly); docs/training.md lists the
DataflowRunner flags.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from beam_jobs.options import new_pipeline, pipeline_options
from esp.contracts import encodes_utf8, loads_json
from esp.settings.training import columns_problem, label_problem

logger = logging.getLogger(__name__)

JIGSAW_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
SPLITS = ("train", "dev", "test")
STATS_FILE = "stats.json"

# Invisible format characters that change a string but not what a reader sees.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u2060\ufeff\u00ad"), None)
_WHITESPACE = re.compile(r"\s+")


class Reject:
    """Why a row was refused: the `reason` of its rejects record."""

    INVALID_JSON = "invalid_json"
    MISSING_ID = "missing_id"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    MISSING_LABEL = "missing_label"
    INVALID_LABEL = "invalid_label"
    UNREADABLE_FILE = "unreadable_file"
    BAD_HEADER = "bad_header"
    UNENCODABLE_TEXT = "unencodable_text"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    input_patterns: tuple[str, ...]
    output_dir: str
    id_column: str = "id"  # "": the data has no ids; each row's id is derived from its text (derived_id)
    text_column: str = "comment_text"
    label_columns: tuple[str, ...] = JIGSAW_LABELS
    input_format: str = "auto"  # auto (by file name), csv or jsonl
    train_ratio: float = 0.8
    dev_ratio: float = 0.1
    test_ratio: float = 0.1
    num_shards: int = 1
    show_progress: bool = False

    def __post_init__(self) -> None:
        ratios = (self.train_ratio, self.dev_ratio, self.test_ratio)
        if any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
        if not self.input_patterns:
            raise ValueError("at least one input pattern is required")
        if not self.label_columns:
            raise ValueError("at least one label column is required")
        problem = label_problem(tuple(self.label_columns)) or columns_problem(self.id_column, self.text_column, tuple(self.label_columns))
        if problem:
            raise ValueError(problem)
        if self.input_format not in ("auto", "csv", "jsonl"):
            raise ValueError(f"input format must be auto, csv or jsonl, got {self.input_format!r}")


def normalise_text(text: str) -> str:
    """NFC, control characters to spaces, invisible format characters removed, whitespace collapsed.

    NFC (not NFKC): NFKC would rewrite full-width letters, ligatures and superscripts that the
    serving graph receives raw; the tokenizer's own NFD + accent stripping then sees the same
    characters in training and serving.
    """
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return _WHITESPACE.sub(" ", text).strip()


def parse_label(value: Any) -> int | None:
    """0 or 1 from 0/1, "0"/"1", "0.0"/"1.0", true/false; None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return int(low == "true")
        try:
            number = float(low)
        except ValueError:
            return None
        return int(number) if number in (0.0, 1.0) else None
    return None


def derived_id(text: str) -> str:
    """An id for data that has none: a hash of the normalised, case-folded text. Copies share it
    (they are one comment after dedupe anyway), and it is stable, so the split is too."""
    return "text-" + hashlib.sha256(text.casefold().encode("utf-8")).hexdigest()[:24]


def split_of(comment_id: str, train_ratio: float, dev_ratio: float) -> str:
    digest = hashlib.sha256(comment_id.encode("utf-8")).digest()
    point = int.from_bytes(digest[:8], "big") / 2.0**64
    if point < train_ratio:
        return "train"
    if point < train_ratio + dev_ratio:
        return "dev"
    return "test"


def _format_of(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".deflate"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {path}: name it .csv or .jsonl, or pass --input-format")


class ParseFile(beam.DoFn):
    """One whole file in, validated rows out (rejects to a tagged output with their reason)."""

    REJECTS = "rejects"

    def __init__(self, config: PrepareConfig) -> None:
        self.config = config

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        try:
            fmt = _format_of(path, self.config.input_format)
        except ValueError as exc:
            yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.UNREADABLE_FILE, str(exc), path, None))
            return
        bar = None
        if self.config.show_progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"reading {os.path.basename(path)}", unit=" rows", leave=False)
        # Whole files: CSV fields may span lines, so no line-based split is safe. Beam's
        # decompressing reader is not an io.RawIOBase, hence read() rather than a text wrapper.
        with readable.open() as raw:
            text_stream = io.StringIO(_decode(_read_all(raw)), newline="")
            if fmt == "csv":
                csv.field_size_limit(1 << 27)
                reader = csv.DictReader(text_stream)
                problem = header_problem(reader.fieldnames, self.config)
                if problem:
                    yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.BAD_HEADER, problem, path, 1))
                rows = iter(()) if problem else self._csv_rows(reader)
            else:
                rows = self._jsonl_rows(text_stream)
            for line_no, row, error in rows:
                if bar is not None:
                    bar.update(1)
                if error is not None:
                    yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.INVALID_JSON, error, path, line_no))
                    continue
                yield from self._validate(row, path, line_no)
        if bar is not None:
            bar.close()

    def _csv_rows(self, reader: csv.DictReader) -> Iterator[tuple[int, dict, str | None]]:
        for row in reader:
            # line_num is the physical line where the record ends (fields may span lines).
            yield reader.line_num, row, None

    def _jsonl_rows(self, stream: io.TextIOBase) -> Iterator[tuple[int, dict, str | None]]:
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                # ESP's one JSON reader: a label given twice on one line (`"spam": 1, "spam": 0`)
                # is refused, not read as whichever copy json.loads keeps. A line nested too deep
                # (RecursionError) or with a number too long for int() (ValueError) is a reject
                # too, not the end of the job.
                obj = loads_json(line)
            except (ValueError, RecursionError) as exc:
                yield line_no, {}, f"invalid JSON: {getattr(exc, 'msg', None) or exc}"
                continue
            if not isinstance(obj, dict):
                yield line_no, {}, "a JSON line must be an object"
                continue
            yield line_no, obj, None

    def _validate(self, row: dict, path: str, line_no: int) -> Iterator[Any]:
        cfg = self.config
        comment_id = ""
        if cfg.id_column:
            raw_id = row.get(cfg.id_column)
            comment_id = str(raw_id).strip() if raw_id is not None else ""
            if not comment_id:
                yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.MISSING_ID, f"no {cfg.id_column!r}", path, line_no, row))
                return
        raw_text = row.get(cfg.text_column)
        if not isinstance(raw_text, str):
            yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.MISSING_TEXT, f"no {cfg.text_column!r} string", path, line_no, row))
            return
        text = normalise_text(raw_text)
        if not text:
            yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.EMPTY_TEXT, "text is empty after normalisation", path, line_no, row))
            return
        # A lone surrogate (JSON's "\ud800") has no UTF-8: the job would fail on it where the row is
        # hashed or written, so it is refused here, as the comment contract refuses it.
        for what, value in (("id", comment_id), ("text", text)):
            if not encodes_utf8(value):
                yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.UNENCODABLE_TEXT, f"{what} is not valid Unicode (a lone surrogate)", path, line_no, row))
                return
        # Labels may be top-level columns (Jigsaw) or inside a "labels" object (ESP's JSONL).
        source = row["labels"] if isinstance(row.get("labels"), dict) else row
        labels = []
        for name in cfg.label_columns:
            value = source.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.MISSING_LABEL, f"no value for label {name!r}", path, line_no, row))
                return
            parsed = parse_label(value)
            if parsed is None:
                yield beam.pvalue.TaggedOutput(self.REJECTS, _reject(Reject.INVALID_LABEL, f"label {name!r} is {_shown(repr(value))[:80]}, not 0 or 1", path, line_no, row))
                return
            labels.append(parsed)
        yield {"id": comment_id or derived_id(text), "text": text, "labels": labels}


def _decode(data: bytes) -> str:
    """A file's text. A byte order mark (Excel's "CSV UTF-8" writes one) is the file's, not part of
    its first column's name or its first JSON line."""
    return data.decode("utf-8-sig", errors="replace")


def header_problem(fieldnames: Sequence[str] | None, config: PrepareConfig) -> str | None:
    """Why a CSV header cannot be read with the configured columns, or None when it can (or the
    file is empty). csv.DictReader keeps the last of two columns of one name and reads a missing
    column as empty: a doubled label column would be read from one copy, silently, and a missing
    one would reject every row as unlabelled instead of saying once what is wrong."""
    if fieldnames is None:
        return None
    named = [column for column in (config.id_column, config.text_column, *config.label_columns) if column]
    for column in named:
        count = list(fieldnames).count(column)
        if count == 0:
            shown = ", ".join(repr(name[:40]) for name in fieldnames[:20]) + (", ..." if len(fieldnames) > 20 else "")
            return f"no column {column[:80]!r} in the header (it has: {shown})"
        if count > 1:
            return f"column {column!r} appears {count} times in the header"
    return None


def check_headers(config: PrepareConfig, head_bytes: int = 1 << 16) -> None:
    """Raises ValueError naming the file and the column when a CSV input's header does not fit the
    columns: one line before the job starts, rather than a file of rejects after it. Reads the first
    `head_bytes` of each file only; a header longer than that is left to the job (bad_header)."""
    for result in FileSystems.match(list(config.input_patterns)):
        for metadata in result.metadata_list:
            if _format_of(metadata.path, config.input_format) != "csv":
                continue
            with FileSystems.open(metadata.path) as raw:
                head = raw.read(head_bytes)
            if len(head) == head_bytes and b"\n" not in head:
                continue
            problem = header_problem(next(csv.reader(io.StringIO(_decode(head), newline="")), None), config)
            if problem:
                raise ValueError(f"{metadata.path}: {problem}")


def _read_all(stream: Any, chunk_bytes: int = 1 << 22) -> bytes:
    """Reads to the end. Beam's CompressedFile.read() with no size stops at 16 MiB (measured on
    the shipped 22 MB CSV), silently cutting the file: read in chunks until EOF instead."""
    parts = []
    while True:
        part = stream.read(chunk_bytes)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _shown(value: object) -> str:
    """A cell as the rejects file shows it: bounded, so one huge row cannot bloat the output, and
    with a lone surrogate escaped, so the row that has one can still be written."""
    return str(value)[:500].encode("utf-8", "backslashreplace").decode("utf-8")


def _reject(reason: str, detail: str, path: str, line_no: int | None, row: dict | None = None) -> dict:
    record = {"reason": reason, "detail": detail, "file": path}
    if line_no:
        record["line"] = line_no
    if row:
        # Enough of the row to find and fix it.
        record["row"] = {_shown(k): (_shown(v) if v is not None else None) for k, v in row.items() if k is not None}
    return record


def dedupe_key(row: dict) -> tuple[str, dict]:
    key = hashlib.sha256(row["text"].casefold().encode("utf-8")).hexdigest()
    return key, row


def resolve_duplicates(item: tuple[str, Iterable[dict]]) -> dict:
    """One comment from its copies: the smallest id, the label-wise maximum (see module doc)."""
    _, copies = item
    copies = sorted(copies, key=lambda r: r["id"])
    keep = dict(copies[0])
    if len(copies) > 1:
        label_sets = {tuple(c["labels"]) for c in copies}
        keep["labels"] = [max(values) for values in zip(*(c["labels"] for c in copies))]
        keep["duplicates"] = len(copies) - 1
        keep["conflict"] = len(label_sets) > 1
    return keep


class StatsFn(beam.CombineFn):
    """Counts for stats.json, from ("row", split, labels, dups, conflict) and ("reject", reason)."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels

    def create_accumulator(self) -> dict:
        return {
            "rows": {s: 0 for s in SPLITS},
            "positives": {s: [0] * self.num_labels for s in SPLITS},
            "rejects": {},
            "duplicates_removed": 0,
            "label_conflicts": 0,
        }

    def add_input(self, acc: dict, element: tuple) -> dict:
        if element[0] == "row":
            _, split, labels, dups, conflict = element
            acc["rows"][split] += 1
            acc["positives"][split] = [a + b for a, b in zip(acc["positives"][split], labels)]
            acc["duplicates_removed"] += dups
            acc["label_conflicts"] += int(conflict)
        else:
            reason = element[1]
            acc["rejects"][reason] = acc["rejects"].get(reason, 0) + 1
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        out = self.create_accumulator()
        for acc in accs:
            for s in SPLITS:
                out["rows"][s] += acc["rows"][s]
                out["positives"][s] = [a + b for a, b in zip(out["positives"][s], acc["positives"][s])]
            for reason, n in acc["rejects"].items():
                out["rejects"][reason] = out["rejects"].get(reason, 0) + n
            out["duplicates_removed"] += acc["duplicates_removed"]
            out["label_conflicts"] += acc["label_conflicts"]
        return out

    def extract_output(self, acc: dict) -> dict:
        return acc


def finish_stats(acc: dict, config: PrepareConfig) -> dict:
    labels = list(config.label_columns)
    total = sum(acc["rows"].values())
    prevalence = {}
    for s in SPLITS:
        n = acc["rows"][s]
        prevalence[s] = {l: (round(p / n, 5) if n else None) for l, p in zip(labels, acc["positives"][s])}
    all_pos = [sum(acc["positives"][s][j] for s in SPLITS) for j in range(len(labels))]
    prevalence["all"] = {l: (round(p / total, 5) if total else None) for l, p in zip(labels, all_pos)}
    return {
        "labels": labels,
        "rows": {**acc["rows"], "total": total},
        "prevalence": prevalence,
        "rejects": dict(sorted(acc["rejects"].items())),
        "rejected_total": sum(acc["rejects"].values()),
        "duplicates_removed": acc["duplicates_removed"],
        "label_conflicts": acc["label_conflicts"],
        "split_ratios": {"train": config.train_ratio, "dev": config.dev_ratio, "test": config.test_ratio},
        "split_rule": "sha256(id)[:8] as a fraction of 2**64 against the cumulative ratios",
        "inputs": list(config.input_patterns),
        "normalisation": "NFC; control characters to spaces; zero-width characters removed; whitespace collapsed",
    }


def write_stats(acc: dict, config: PrepareConfig) -> dict:
    stats = finish_stats(acc, config)
    with FileSystems.create(FileSystems.join(config.output_dir, STATS_FILE)) as f:
        f.write((json.dumps(stats, indent=2) + "\n").encode("utf-8"))
    return stats


class EncodeExample(beam.DoFn):
    def process(self, row: dict) -> Iterator[bytes]:
        from training.records import encode_example

        yield encode_example(row["id"], row["text"], row["labels"])


def _clear_outputs(output_dir: str) -> None:
    """Removes a previous run's outputs, so a smaller shard count leaves no stale shards behind."""
    patterns = [FileSystems.join(output_dir, p) for p in ("train-*", "dev-*", "test-*", "rejects-*", STATS_FILE)]
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def build_pipeline(pipeline: beam.Pipeline, config: PrepareConfig) -> None:
    parsed = (
        pipeline
        | "Patterns" >> beam.Create(list(config.input_patterns))
        | "Match" >> fileio.MatchAll()
        # Spreads files over workers on Dataflow; a no-op in effect on the DirectRunner.
        | "Reshuffle" >> beam.Reshuffle()
        | "Open" >> fileio.ReadMatches()
        | "Parse" >> beam.ParDo(ParseFile(config)).with_outputs(ParseFile.REJECTS, main="rows")
    )
    comments = (
        parsed.rows
        | "DedupeKey" >> beam.Map(dedupe_key)
        | "GroupCopies" >> beam.GroupByKey()
        | "Resolve" >> beam.Map(resolve_duplicates)
        | "Split" >> beam.Map(lambda r: {**r, "split": split_of(r["id"], config.train_ratio, config.dev_ratio)})
    )
    for split in SPLITS:
        (
            comments
            | f"Only{split}" >> beam.Filter(lambda r, s=split: r["split"] == s)
            | f"Encode{split}" >> beam.ParDo(EncodeExample())
            | f"Write{split}" >> beam.io.WriteToTFRecord(
                FileSystems.join(config.output_dir, split), file_name_suffix=".tfrecord", num_shards=config.num_shards
            )
        )
    (
        parsed.rejects
        | "RejectJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False, sort_keys=True))
        | "WriteRejects" >> beam.io.WriteToText(FileSystems.join(config.output_dir, "rejects"), file_name_suffix=".jsonl", num_shards=1)
    )
    row_facts = comments | "RowFacts" >> beam.Map(lambda r: ("row", r["split"], r["labels"], r.get("duplicates", 0), r.get("conflict", False)))
    reject_facts = parsed.rejects | "RejectFacts" >> beam.Map(lambda r: ("reject", r["reason"]))
    (
        (row_facts, reject_facts)
        | "AllFacts" >> beam.Flatten()
        | "Stats" >> beam.CombineGlobally(StatsFn(len(config.label_columns)))
        | "WriteStats" >> beam.Map(write_stats, config)
    )


def run(config: PrepareConfig, beam_args: Sequence[str] = ()) -> dict:
    """Runs the pipeline to completion and returns the stats it wrote."""
    options = pipeline_options(beam_args)
    if not FileSystems.exists(config.output_dir):
        FileSystems.mkdirs(config.output_dir)
    _clear_outputs(config.output_dir)
    with new_pipeline(options) as pipeline:
        build_pipeline(pipeline, config)
    with FileSystems.open(FileSystems.join(config.output_dir, STATS_FILE)) as f:
        return json.loads(f.read().decode("utf-8"))
