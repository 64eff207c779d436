"""`esp publish`: N rows in, exactly N intact messages out; every bad row named by its line."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esp.contracts import parse_comment
from esp.errors import EspError
from esp.pubsub_admin import init_resources
from esp.publishing import open_text, publish_file, read_rows
from esp.settings import CommentSettings, PubSubSettings
from tests.fixtures.fuzz import examples
from tests.fixtures.pubsub import create_subscription, pull_until

TEXTS = ["plain", "naïve café", "emoji 🙂🔥", "Ω кириллица 中文", 'quote " and, comma', "multi\nline\ntext", "x" * 3000]


def _comments(n: int) -> list[dict[str, str]]:
    return [{"id": f"c{i:04d}", "text": f"{TEXTS[i % len(TEXTS)]} #{i}"} for i in range(n)]


@pytest.fixture
def ready(pubsub_settings: PubSubSettings) -> PubSubSettings:
    init_resources(pubsub_settings)
    create_subscription(pubsub_settings, pubsub_settings.comments_topic, "reader-" + pubsub_settings.subscription)
    return pubsub_settings


def _read_back(settings: PubSubSettings, n: int) -> dict[str, str]:
    msgs = pull_until(settings, "reader-" + settings.subscription, n, timeout_s=30)
    out = {}
    for m in msgs:
        c = parse_comment(m.message.data)
        out[c.id] = c.text
    assert len(msgs) == n, f"expected {n} messages, pulled {len(msgs)}"
    return out


def test_jsonl_rows_arrive_intact(ready: PubSubSettings, tmp_path: Path) -> None:
    rows = _comments(250)
    path = tmp_path / "comments.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = publish_file(str(path), pubsub=ready, comments=CommentSettings(), progress=False)
    assert (summary.published, summary.rejected, summary.failed) == (250, 0, 0)
    assert _read_back(ready, 250) == {r["id"]: r["text"] for r in rows}


def test_gzipped_csv_with_column_mapping_arrives_intact(ready: PubSubSettings, tmp_path: Path) -> None:
    rows = _comments(120)
    path = tmp_path / "comments.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["comment_id", "label", "body"])
        for r in rows:
            w.writerow([r["id"], "0", r["text"]])
    summary = publish_file(
        str(path), pubsub=ready, comments=CommentSettings(), id_column="comment_id", text_column="body", progress=False
    )
    assert (summary.published, summary.rejected, summary.failed) == (120, 0, 0)
    assert _read_back(ready, 120) == {r["id"]: r["text"] for r in rows}


def test_jigsaw_columns_are_found_without_options(ready: PubSubSettings, tmp_path: Path) -> None:
    path = tmp_path / "jigsaw.csv"
    path.write_text('id,comment_text,toxic\na1,"hello\nthere",0\na2,second,1\n', encoding="utf-8")
    summary = publish_file(str(path), pubsub=ready, comments=CommentSettings(), progress=False)
    assert summary.published == 2
    assert _read_back(ready, 2) == {"a1": "hello\nthere", "a2": "second"}


def test_every_violation_is_rejected_with_its_line(ready: PubSubSettings, tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "ok-1", "text": "fine"}),            # 1
        '{"id": "broken", "text": ',                           # 2 invalid JSON
        json.dumps({"text": "no id"}),                         # 3 missing id
        json.dumps({"id": "e", "text": "   "}),                # 4 empty text
        json.dumps({"id": "n", "text": 12}),                   # 5 non-string text
        json.dumps({"id": 5, "text": "numeric id"}),           # 6 wrong id type
        json.dumps(["not", "an", "object"]),                   # 7 not an object
        json.dumps({"id": "big", "text": "z" * 70_000}),       # 8 over the 64 KiB limit
        "",                                                    # 9 blank: skipped, not an error
        json.dumps({"id": "ok-2", "text": "also fine"}),       # 10
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = publish_file(str(path), pubsub=ready, comments=CommentSettings(), progress=False)
    assert summary.published == 2 and summary.rejected == 7 and not summary.ok
    by_line = dict(summary.rejections)
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8]
    assert by_line[2].startswith("invalid_json")
    assert by_line[3].startswith("missing_id")
    assert by_line[4].startswith("empty_text")
    assert by_line[5].startswith("non_string_text")
    assert by_line[6].startswith("invalid_id")
    assert by_line[7].startswith("not_an_object")
    assert by_line[8].startswith("body_too_large")
    assert set(_read_back(ready, 2)) == {"ok-1", "ok-2"}


def test_invalid_utf8_is_rejected_with_its_line(ready: PubSubSettings, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    summary = publish_file(str(path), pubsub=ready, comments=CommentSettings(), progress=False)
    assert summary.published == 1
    assert [(line, reason.split(":")[0]) for line, reason in summary.rejections] == [(2, "invalid_utf8")]


def test_csv_rows_report_the_line_they_start_on(ready: PubSubSettings, tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,text\nr1,"two\nlines"\nr2,\n,no id\nr4,fine\n', encoding="utf-8")
    summary = publish_file(str(path), pubsub=ready, comments=CommentSettings(), progress=False)
    assert summary.published == 2
    assert [(line, reason.split(":")[0]) for line, reason in summary.rejections] == [
        (4, "empty_text"),
        (5, "invalid_id"),
    ]


def _esp(*args: str, stdin: bytes | None = None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "esp.cli.main", *args], input=stdin, capture_output=True, env=env, timeout=120
    )


def _env(settings: PubSubSettings) -> dict[str, str]:
    return {
        "PUBSUB_EMULATOR_HOST": settings.emulator_host or "",
        "ESP_PROJECT": settings.project,
        "ESP_COMMENTS_TOPIC": settings.comments_topic,
    }


def test_cli_reads_stdin_and_exits_zero(ready: PubSubSettings) -> None:
    rows = _comments(30)
    stdin = "".join(json.dumps(r) + "\n" for r in rows).encode()
    result = _esp("publish", "-", "--no-progress", stdin=stdin, env_extra=_env(ready))
    assert result.returncode == 0, result.stderr.decode()
    assert "published 30, rejected 0, failed 0" in result.stdout.decode()
    assert len(_read_back(ready, 30)) == 30


def test_cli_exit_code_is_nonzero_when_rows_are_rejected(ready: PubSubSettings, tmp_path: Path) -> None:
    path = tmp_path / "some-bad.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n', encoding="utf-8")
    result = _esp("publish", str(path), env_extra=_env(ready))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "rejected line 2: missing_text: no 'text' field" in err
    assert "published 1, rejected 1, failed 0" in result.stdout.decode()
    assert "Traceback" not in err


def test_invalid_utf8_in_csv_is_rejected_with_its_line(ready: PubSubSettings, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"id,text\nr1,good\nr2,caf\xe9\nr3,also good\n")
    summary = publish_file(str(path), pubsub=ready, comments=CommentSettings(), progress=False)
    assert summary.published == 2
    assert [(line, reason.split(":")[0]) for line, reason in summary.rejections] == [(3, "invalid_utf8")]


# ---------------------------------------------------------------------------------------------
# The row reader against hostile input: every row is a comment or a rejection with its reason.

# What open_text hands the reader: any text, with invalid UTF-8 bytes as lone surrogate escapes.
file_text = st.text(st.characters(codec=None), max_size=300) | st.binary(max_size=300).map(
    lambda b: b.decode("utf-8", errors="surrogateescape")
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
json_rows = st.lists(
    st.fixed_dictionaries({}, optional={"id": json_values, "text": json_values, "x": json_values}).map(json.dumps)
    | st.sampled_from(['{"id": "a", "text": "\\ud800"}', '{"id": "\\udfff", "text": "t"}', "1" * 5000, "[" * 5000,
                       '{"id": ' + "9" * 5000 + ', "text": "t"}', '{"id": "a", "text": 1e999}', "\x00", "\ufeff{}"]),
    max_size=6,
).map("\n".join)  # fmt: skip


def _read_all(text: str, fmt: str) -> list:
    try:
        rows = list(read_rows(io.StringIO(text, newline=""), fmt, id_column="id", text_column=None, max_body_bytes=1000))
    except EspError as exc:  # only the CSV header may refuse the whole file, with a reason
        assert fmt == "csv" and str(exc)
        return []
    for row in rows:
        assert (row.comment is None) != (row.error is None)
        if row.comment is None:
            assert row.error and row.error.split(":")[0].isidentifier()
            # invalid_row is _validated's catch-all: a row that reached it crashed the contract
            # rather than breaking it, and the fuzzer is here to find exactly that.
            assert row.error.split(":")[0] != "invalid_row", row.error
        else:
            row.comment.to_json_bytes()  # what is published must encode
    return rows


@settings(max_examples=examples(200), deadline=None)
@given(file_text | json_rows, st.sampled_from(["jsonl", "csv"]))
def test_any_input_gives_comments_or_rejections_with_reasons(text: str, fmt: str) -> None:
    _read_all(text, fmt)


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.tuples(file_text, file_text), max_size=5))
def test_any_csv_rows_give_comments_or_rejections_with_reasons(rows: list[tuple[str, str]]) -> None:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["id", "text"])
    writer.writerows(rows)
    _read_all(out.getvalue(), "csv")


def test_valid_json_python_cannot_hold_is_a_rejection() -> None:
    text = "\n".join(['{"id": "ok", "text": "fine"}', "[" * 100_000, '{"id": 1' + "0" * 5000 + ', "text": "t"}',
                      '{"id": "a", "text": "lone \\ud800"}'])  # fmt: skip
    rows = _read_all(text, "jsonl")
    assert [r.line for r in rows] == [1, 2, 3, 4] and rows[0].comment is not None
    assert [r.error.split(":")[0] for r in rows[1:]] == ["invalid_json", "invalid_json", "invalid_utf8"]


def test_ambiguous_json_is_a_rejection_with_its_reason() -> None:
    text = "\n".join(['{"id": "a", "text": "kind", "text": "abuse"}', '{"id": "b", "text": "t", "w": NaN}',
                      '{"id": "c", "text": "fine"}'])  # fmt: skip
    rows = _read_all(text, "jsonl")
    assert [r.error for r in rows[:2]] == [
        "invalid_json: ambiguous JSON: key 'text' appears more than once in one object",
        "invalid_json: ambiguous JSON: NaN is not a JSON value",
    ]
    assert rows[2].comment is not None and rows[2].comment.text == "fine"


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.csv", "bom.csv.gz"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_not_part_of_its_first_row(tmp_path: Path, name: str) -> None:
    # Spreadsheet programs save "CSV UTF-8" with a BOM: without this the header's first column is
    # "\ufeffid" and the whole file is refused for want of an id column.
    content = '{"id": "a", "text": "first"}\n' if name.endswith(".jsonl") else "id,text\na,first\n"
    data = b"\xef\xbb\xbf" + content.encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    fmt = "jsonl" if ".jsonl" in name else "csv"
    with open_text(str(path)) as stream:
        rows = list(read_rows(stream, fmt, id_column="id", text_column="text", max_body_bytes=65536))
    first_row_line = 1 if fmt == "jsonl" else 2  # under the CSV header
    assert [(r.line, r.comment.id if r.comment else r.error) for r in rows] == [(first_row_line, "a")]


def test_a_truncated_gzip_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(c) + "\n" for c in _comments(2000)).encode())
    path.write_bytes(whole[: len(whole) // 2])
    with open_text(str(path)) as stream, pytest.raises(EspError, match="reading stopped after line"):
        for _ in read_rows(stream, "jsonl", id_column="id", text_column=None, max_body_bytes=65536):
            pass
