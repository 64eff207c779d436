"""`esp prepare-data`: the Beam job on the DirectRunner, its normalisation, dedupe, split and stats."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_jobs.prepare_data import PrepareConfig, normalise_text, parse_label, run, split_of
from training import records

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
HEADER = ["id", "comment_text", *LABELS]


def _csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def _labels(*ones: str) -> list[str]:
    return ["1" if l in ones else "0" for l in LABELS]


def test_normalise_text() -> None:
    assert normalise_text("  two\n\nlines\t here  ") == "two lines here"
    assert normalise_text("cafe\u0301") == "café"  # NFC composes
    assert normalise_text("zero\u200bwidth\ufeff") == "zerowidth"
    assert normalise_text("bell\x07ring\x00") == "bell ring"
    assert normalise_text("\u3000\n ") == ""
    # NFC, not NFKC: full-width letters stay as the serving graph will receive them.
    assert normalise_text("ｆｕｌｌ") == "ｆｕｌｌ"


@pytest.mark.parametrize(("raw", "want"), [("1", 1), ("0", 0), ("1.0", 1), (" 0 ", 0), ("true", 1), (False, 0), (1, 1), ("2", None), ("x", None), (0.5, None), (None, None)])
def test_parse_label(raw, want) -> None:
    assert parse_label(raw) == want


def test_split_is_a_pure_function_of_the_id() -> None:
    ids = [f"{i:016x}" for i in range(20_000)]
    first = [split_of(i, 0.8, 0.1) for i in ids]
    assert first == [split_of(i, 0.8, 0.1) for i in ids]
    share = {s: first.count(s) / len(ids) for s in ("train", "dev", "test")}
    assert abs(share["train"] - 0.8) < 0.01 and abs(share["dev"] - 0.1) < 0.01 and abs(share["test"] - 0.1) < 0.01
    # Changing the ratios moves only the comments near the boundaries, never test into train.
    wider = [split_of(i, 0.7, 0.1) for i in ids]
    assert all(not (a == "test" and b == "train") for a, b in zip(first, wider))


def test_pipeline_cleans_dedupes_splits_and_counts(tmp_path: Path) -> None:
    multi_line = "first line\nsecond, with a comma\n\"quoted\" third"
    _csv(
        tmp_path / "in.csv",
        [
            ["a1", multi_line, *_labels()],
            ["b2", "You are an IDIOT", *_labels("toxic", "insult")],
            ["a0", "you are an idiot", *_labels("toxic", "obscene")],  # same text, case folded: duplicate
            ["c3", "   \n\t ", *_labels()],  # empty after normalisation
            ["d4", "broken label", "1", "0", "maybe", "0", "0", "0"],
            ["", "no id here", *_labels()],
            ["e5", "missing label", "1", "0", "0", "0", "0", ""],
        ]
        + [[f"x{i:04d}", f"comment number {i}", *_labels(*(["toxic"] if i % 4 == 0 else []))] for i in range(200)],
    )
    jsonl_path = tmp_path / "more.jsonl"
    jsonl_path.write_text(
        json.dumps({"id": "j1", "comment_text": "from jsonl", "labels": dict(zip(LABELS, [1, 0, 0, 1, 0, 0]))}) + "\n"
        + "{not json\n"
        + json.dumps({"id": "j2", "comment_text": "flat labels", **dict(zip(LABELS, [0] * 6))}) + "\n"
    )
    out = tmp_path / "out"
    stats = run(PrepareConfig(input_patterns=(str(tmp_path / "*.csv"), str(jsonl_path)), output_dir=str(out)))

    kept = 1 + 1 + 200 + 2  # a1, the idiot pair as one, the numbered rows, two JSONL rows
    assert stats["rows"]["total"] == kept
    assert stats["duplicates_removed"] == 1 and stats["label_conflicts"] == 1
    assert stats["rejects"] == {"empty_text": 1, "invalid_json": 1, "invalid_label": 1, "missing_id": 1, "missing_label": 1}
    assert stats["labels"] == list(LABELS)
    assert sum(stats["rows"][s] for s in ("train", "dev", "test")) == kept

    rejects = [json.loads(l) for f in out.glob("rejects-*.jsonl") for l in f.read_text().splitlines()]
    assert {r["reason"] for r in rejects} == set(stats["rejects"])
    assert all(r["detail"] and r["file"] for r in rejects)

    rows = {}
    for split in ("train", "dev", "test"):
        part = records.read_split(str(out), split, len(LABELS))
        assert stats["rows"][split] == len(part)
        for cid, text, labels in zip(part.ids, part.texts, part.labels):
            assert split_of(cid, 0.8, 0.1) == split
            rows[cid] = (text, labels.tolist())
    assert rows["a1"][0] == 'first line second, with a comma "quoted" third'
    # The duplicate pair: smallest id survives, labels are the union.
    assert "b2" not in rows
    assert rows["a0"][1] == [1, 0, 1, 0, 1, 0]
    assert rows["j1"][1] == [1, 0, 0, 1, 0, 0]


def test_rerun_with_more_rows_moves_no_comment(tmp_path: Path) -> None:
    base = [[f"id{i:05d}", f"text {i}", *_labels()] for i in range(150)]
    run(PrepareConfig(input_patterns=(str(_csv(tmp_path / "a.csv", base)),), output_dir=str(tmp_path / "one")))
    grown = list(reversed(base)) + [[f"new{i}", f"new text {i}", *_labels()] for i in range(50)]
    run(PrepareConfig(input_patterns=(str(_csv(tmp_path / "b.csv", grown)),), output_dir=str(tmp_path / "two")))

    def splits(d: Path) -> dict[str, str]:
        return {cid: s for s in ("train", "dev", "test") for cid in records.read_split(str(d), s, len(LABELS)).ids}

    one, two = splits(tmp_path / "one"), splits(tmp_path / "two")
    assert len(one) == 150 and len(two) == 200
    assert all(two[cid] == split for cid, split in one.items())


def test_cli_rejects_a_missing_input_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "prepare-data", "--input", str(tmp_path / "nope-*.csv"), "--data-dir", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode != 0
    assert "matches no file" in result.stderr and "Traceback" not in result.stderr


def test_cli_prepares_data(tmp_path: Path) -> None:
    src = _csv(tmp_path / "in.csv", [[f"r{i}", f"row {i}", *_labels(*(["toxic"] if i % 3 else []))] for i in range(60)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "prepare-data", "--input", str(src), "--data-dir", str(tmp_path / "o"), "--no-progress", "--runner=DirectRunner"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prepared 60 comments" in result.stdout
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["rows"]["total"] == 60


def test_any_text_and_label_columns_and_no_id_column(tmp_path: Path) -> None:
    """Another task's data: its own text and label columns, no ids at all. Ids are derived from the
    text, so copies collapse into one comment and the split is as stable as with real ids."""
    path = tmp_path / "tickets.jsonl"
    rows = [
        {"body": "Buy cheap watches", "spam": 1, "urgent": 0},
        {"body": "buy  CHEAP watches", "spam": 0, "urgent": 1},  # the same text once normalised and case-folded
        {"body": "Server is down", "spam": 0, "urgent": 1},
        {"body": "", "spam": 0, "urgent": 0},
        {"body": "no label here", "spam": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    stats = run(PrepareConfig(input_patterns=(str(path),), output_dir=str(out), id_column="", text_column="body", label_columns=("spam", "urgent")))
    assert stats["labels"] == ["spam", "urgent"]
    assert stats["rows"]["total"] == 2 and stats["duplicates_removed"] == 1 and stats["label_conflicts"] == 1
    assert stats["rejects"] == {"empty_text": 1, "missing_label": 1}
    kept = {}
    for split in ("train", "dev", "test"):
        try:
            s = records.read_split(str(out), split, 2)
        except FileNotFoundError:
            continue
        kept.update({i: (t, list(l)) for i, t, l in zip(s.ids, s.texts, s.labels)})
    assert all(i.startswith("text-") for i in kept)
    by_text = {t.casefold(): l for t, l in kept.values()}
    assert by_text["buy cheap watches"] == [1.0, 1.0]  # label-wise maximum over the copies
    again = run(PrepareConfig(input_patterns=(str(path),), output_dir=str(tmp_path / "again"), id_column="", text_column="body", label_columns=("spam", "urgent")))
    assert again["rows"] == stats["rows"]


@pytest.mark.parametrize("labels", [("is spam",), ("esp_score",), ("1st",), ("a", "a"), ("toxic", "x" * 65)])
def test_label_names_that_cannot_be_model_outputs_are_refused(tmp_path: Path, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="label"):
        PrepareConfig(input_patterns=("x.csv",), output_dir=str(tmp_path), label_columns=labels)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    result = subprocess.run([sys.executable, "-m", "esp.cli.main", "prepare-data", "--label-columns", ",".join(labels), "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "label" in result.stderr


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=70))
def test_label_name_rule_accepts_only_safe_output_names(name: str) -> None:
    import re

    from esp.settings.training import RESERVED_LABELS, label_problem

    ok = label_problem((name,)) is None
    safe = re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name) and not name.lower().startswith("esp_")
    assert ok == bool(safe and name.lower() not in RESERVED_LABELS)  # tests/test_hostile_labels.py: why reserved
