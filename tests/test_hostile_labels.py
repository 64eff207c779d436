"""Hostile label names and label files on the "Add ML Endpoint" surface (docs/training.md, section 7).

`esp prepare-data` and `esp train` take any CSV or JSONL and any label columns; everything downstream
takes its names from the model's signature. The promise: a name or a file that cannot work is
refused early, in one line naming the column (non-zero exit, no traceback), a bad row is a reject
with its reason, and a model with odd labels that someone else exported never makes one label's
score land under another label's name or over a field of the score row.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import perspective as pv
from beam_jobs.prepare_data import PrepareConfig, run
from esp.contracts import Score
from esp.errors import ConfigError
from esp.settings.training import label_problem


def _esp(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    return subprocess.run([sys.executable, "-m", "esp.cli.main", *args], check=False, capture_output=True, text=True, env=env, timeout=timeout)


def _one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # TensorFlow's own start-up lines may come first; ESP's answer is one line of its own.
    lines = [line for line in result.stderr.splitlines() if line.startswith("esp:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


def _tickets(n: int, spam=lambda i: i % 3 == 0, urgent=lambda i: i % 4 == 0) -> list[dict]:
    return [{"body": f"ticket number {i} about thing {i * 7}", "spam": int(spam(i)), "urgent": int(urgent(i))} for i in range(n)]


def _write_csv(path: Path, header: list[str], rows: list[list[object]], *, bom: bool = False) -> Path:
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _config(path: Path, out: Path, labels: tuple[str, ...] = ("spam", "urgent")) -> PrepareConfig:
    return PrepareConfig(input_patterns=(str(path),), output_dir=str(out), id_column="", text_column="body", label_columns=labels)


# ---------------------------------------------------------------------------------------------
# Label names: refused at prepare-data, before anything is read


@pytest.mark.parametrize(
    "labels, named",
    [
        (("toxic", "TOXIC"), "TOXIC"),  # one Perspective attribute, one BigQuery column
        (("spam", "Spam"), "Spam"),
        (("spam", "id"), "id"),  # the scores table's id column: its score would overwrite the comment id
        (("Flags",), "Flags"),  # the scores table's flags would overwrite its score
        (("model_version",), "model_version"),
        (("SCORED_AT",), "SCORED_AT"),
        (("run_id",), "run_id"),
    ],
)
def test_labels_that_collide_downstream_are_refused_in_one_line(tmp_path: Path, labels: tuple[str, ...], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PrepareConfig(input_patterns=("x.csv",), output_dir=str(tmp_path), label_columns=labels)
    _one_line_refusal(_esp("prepare-data", "--label-columns", ",".join(labels), "--data-dir", str(tmp_path)), repr(named))


def test_every_column_of_the_scores_table_is_a_reserved_label_name() -> None:
    from beam_jobs import bigquery as bq
    from esp.settings.training import RESERVED_LABELS

    assert set(bq.SCORES_FIXED_COLUMNS) <= RESERVED_LABELS
    assert label_problem(("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")) is None


@pytest.mark.parametrize("option", ["--text-column", "--id-column"])
def test_a_column_read_as_text_or_id_and_as_a_label_is_refused(tmp_path: Path, option: str) -> None:
    """`--text-column spam --label-columns spam` would train the model on its own answer; an id
    column that is a label would split the data by that label (the split hashes the id)."""
    field = option.removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError, match="spam"):
        PrepareConfig(input_patterns=("x.csv",), output_dir=str(tmp_path), label_columns=("spam", "urgent"), **{field: "spam"})
    _one_line_refusal(_esp("prepare-data", option, "spam", "--label-columns", "spam,urgent", "--data-dir", str(tmp_path)), "'spam'")


# ---------------------------------------------------------------------------------------------
# A model exported elsewhere, with labels prepare-data would refuse: consumers must not mix them up

CASE_TWINS = st.lists(
    st.sampled_from(["toxic", "TOXIC", "Toxic", "toxicity", "TOXICITY", "obscene", "PROFANITY", "profanity", "spam", "SPAM", "ß", "SS", "ss"]),
    unique=True, min_size=1,
)


@settings(max_examples=300, deadline=None)
@given(CASE_TWINS)
def test_perspective_attributes_are_one_to_one_whatever_the_labels(labels: list[str]) -> None:
    attributes = pv.attribute_map(labels)
    assert sorted(attributes.values()) == sorted(labels)  # every label offered, each once
    for name, label in attributes.items():
        assert name in (label, label.upper(), pv.PERSPECTIVE_NAMES.get(label))


def _score(probabilities: dict[str, float]) -> Score:
    now = dt.datetime.now(dt.UTC)
    return Score(id="c-1", probabilities=probabilities, thresholds={k: 0.5 for k in probabilities}, model_name="m",
                 model_version=1, truncated=False, scored_at=now)


@pytest.mark.parametrize("labels", [("spam", "id"), ("flags",), ("ID",), ("toxic", "TOXIC"), ("toxic\n",)])
def test_a_backfill_row_refuses_labels_that_would_overwrite_its_columns(labels: tuple[str, ...]) -> None:
    """Before: a label `id` put its probability in the comment id's place, the flags overwrote a
    label `flags`, and nothing said so."""
    from beam_jobs.backfill import score_row

    with pytest.raises(ConfigError, match="label"):
        score_row(_score({label: 0.25 for label in labels}), "run-1")
    row = score_row(_score({"spam": 0.25, "urgent": 0.5}), "run-1")
    assert row["id"] == "c-1" and row["spam"] == 0.25 and row["flags"] == ["urgent"]


@pytest.mark.slow
def test_a_served_model_with_labels_differing_only_in_case_scores_each_under_its_own_name(start_model_server, start_api, tmp_path: Path) -> None:
    from tests.fixtures.models import export_test_model

    labels = ("toxic", "TOXIC", "Toxic", "constructor", "spam")
    base = tmp_path / "odd"
    export_test_model(base, 1, labels=labels)
    api = start_api(model_server=start_model_server(base))
    text = "you are a wonderful person, thank you"
    status, _, record = api.post_json("/v1/score", {"id": "c-1", "text": text})
    assert status == 200, record
    assert set(record["scores"]) == set(labels)
    assert len(set(record["scores"].values())) == len(labels)  # the test model gives each label its own score
    want = {"TOXICITY": "toxic", "TOXIC": "TOXIC", "Toxic": "Toxic", "CONSTRUCTOR": "constructor", "SPAM": "spam"}
    status, _, analyzed = api.post_json("/v1alpha1/comments:analyze", {"comment": {"text": text}, "requestedAttributes": {n: {} for n in want}})
    assert status == 200, analyzed
    got = {name: entry["summaryScore"]["value"] for name, entry in analyzed["attributeScores"].items()}
    assert got == {name: record["scores"][label] for name, label in want.items()}


# ---------------------------------------------------------------------------------------------
# The user's file


def test_a_csv_with_a_byte_order_mark_loses_no_row(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts the file with a BOM: it belongs to the file, not to the first
    column's name (else that column, here the text, is missing from every row)."""
    rows = _tickets(40)
    src = _write_csv(tmp_path / "t.csv", ["body", "spam", "urgent"], [[r["body"], r["spam"], r["urgent"]] for r in rows], bom=True)
    stats = run(_config(src, tmp_path / "out"))
    assert stats["rejects"] == {}
    assert stats["rows"]["total"] == 40


@pytest.mark.parametrize(
    "header, words",
    [
        (["body", "spam", "urgent", "spam"], ("'spam'", "2 times")),  # DictReader would keep the last copy, silently
        (["body", "spam", "urgnet"], ("no column 'urgent'", "'urgnet'")),  # every row would be an unlabelled reject
    ],
)
def test_a_csv_header_that_does_not_fit_the_columns_is_refused_in_one_line(tmp_path: Path, header: list[str], words: tuple[str, ...]) -> None:
    rows = [[f"ticket {i}", i % 2, 1, 0][: len(header)] for i in range(30)]
    src = _write_csv(tmp_path / "t.csv", header, rows)
    out = tmp_path / "out"
    result = _esp("prepare-data", "--input", str(src), "--id-column", "", "--text-column", "body", "--label-columns", "spam,urgent",
                  "--data-dir", str(out), "--no-progress", "--runner=DirectRunner")
    _one_line_refusal(result, str(src), *words)
    # The job itself (a pipeline built without the CLI's check) rejects the file with the same reason.
    stats = run(_config(src, out))
    assert stats["rows"]["total"] == 0 and stats["rejects"] == {"bad_header": 1}
    rejects = [json.loads(line) for f in out.glob("rejects-*.jsonl") for line in f.read_text().splitlines()]
    assert all(word in rejects[0]["detail"] for word in words[:1])


def test_jsonl_lines_read_one_way_only_or_not_at_all_are_rejects_not_the_end_of_the_job(tmp_path: Path) -> None:
    good = _tickets(30)
    hostile = [
        '{"body": "kind words", "spam": 0, "spam": 1, "urgent": 0}',  # which spam? json.loads keeps the last
        '{"body": "not a number", "spam": NaN, "urgent": 0}',
        '{"body": "huge", "spam": 1' + "0" * 5000 + ', "urgent": 0}',  # int() refuses over 4,300 digits
        "[" * 100_000 + "]" * 100_000,  # nested past the recursion limit
        '["a", "list"]',
    ]
    lone_surrogate = '{"body": "half an emoji \\ud83d here", "spam": 0, "urgent": 1}'  # has no UTF-8
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(r) for r in good[:15]] + hostile + [lone_surrogate] + [json.dumps(r) for r in good[15:]]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")  # with a BOM before the first (good) line
    out = tmp_path / "out"
    stats = run(_config(path, out))
    assert stats["rows"]["total"] == 30
    assert stats["rejects"] == {"invalid_json": len(hostile), "unencodable_text": 1}
    rejects = [json.loads(line) for f in out.glob("rejects-*.jsonl") for line in f.read_text().splitlines()]
    assert [r["line"] for r in rejects if r["reason"] == "unencodable_text"] == [15 + len(hostile) + 1]


def test_prepare_data_that_keeps_no_comment_fails_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"body": f"ticket {i}", "spam": i % 2, "urgnet": 0}) + "\n" for i in range(20)))
    result = _esp("prepare-data", "--input", str(path), "--id-column", "", "--text-column", "body", "--label-columns", "spam,urgent",
                  "--data-dir", str(tmp_path / "out"), "--no-progress", "--runner=DirectRunner")
    _one_line_refusal(result, "no comment survived", '"missing_label": 20', "rejects-")


# ---------------------------------------------------------------------------------------------
# esp train: what stats.json names, and labels there is nothing to learn from


def test_train_refuses_labels_in_stats_json_that_prepare_data_would_refuse(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "stats.json").write_text(json.dumps({"labels": ["toxic", "TOXIC"]}))
    result = _esp("train", "--profile", "tiny", "--data-dir", str(data), "--export-base-path", str(tmp_path / "m"),
                  "--work-dir", str(tmp_path / "w"), "--report-dir", str(tmp_path / "r"), "--no-progress")
    _one_line_refusal(result, "stats.json", "'TOXIC'", "case")


def test_train_refuses_a_label_without_positives_in_one_line(tmp_path: Path) -> None:
    """A label column that is all 0 (or all 1) teaches nothing: the model would still ship it, with
    a placeholder threshold, and every consumer would read its scores as a learned label's."""
    rows = _tickets(300, spam=lambda i: False)
    src = _write_csv(tmp_path / "t.csv", ["body", "spam", "urgent"], [[r["body"], r["spam"], r["urgent"]] for r in rows])
    run(_config(src, tmp_path / "data"))
    result = _esp("train", "--profile", "tiny", "--data-dir", str(tmp_path / "data"), "--export-base-path", str(tmp_path / "m"),
                  "--work-dir", str(tmp_path / "w"), "--report-dir", str(tmp_path / "r"), "--no-progress", "--no-baselines")
    _one_line_refusal(result, "'spam'", "no positive")
    assert not (tmp_path / "m").exists()


def test_evaluate_refuses_data_labelled_in_another_order_in_one_line(tmp_path: Path) -> None:
    """The test split's labels are numbers in the data's order: a model with `spam, urgent` scored
    against data prepared as `urgent, spam` reported spam's ROC AUC on urgent's answers."""
    from tests.fixtures.models import export_test_model

    rows = _tickets(200)
    src = _write_csv(tmp_path / "t.csv", ["body", "spam", "urgent"], [[r["body"], r["spam"], r["urgent"]] for r in rows])
    run(_config(src, tmp_path / "swapped", labels=("urgent", "spam")))
    export_test_model(tmp_path / "m", 1, labels=("spam", "urgent"))
    result = _esp("evaluate", "--model-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path / "swapped"),
                  "--report-dir", str(tmp_path / "r"), "--no-baselines", "--no-progress")
    _one_line_refusal(result, "urgent, spam", "spam, urgent")


@pytest.mark.slow
def test_a_backfill_into_bigquery_refuses_a_model_whose_label_is_a_column(bigquery_emulator, bq_dataset: str, tmp_path: Path) -> None:
    from beam_jobs import bigquery as bq
    from tests.fixtures.bigquery import PROJECT
    from tests.fixtures.models import export_test_model

    export_test_model(tmp_path / "m", 1, labels=("spam", "flags"))
    comments = tmp_path / "in.jsonl"
    comments.write_text("".join(json.dumps({"id": f"c{i}", "text": f"comment {i}"}) + "\n" for i in range(5)))
    result = _esp("backfill", "--input", str(comments), "--bq-scores-table", f"{bq_dataset}.scores", "--backend", "saved_model",
                  "--saved-model-dir", str(tmp_path / "m"), "--bigquery-api-endpoint", bigquery_emulator.api_endpoint,
                  "--bigquery-storage-endpoint", bigquery_emulator.storage_endpoint, "--runner=DirectRunner")
    # Refused in the pre-flight, which reads the labels from saved_model.pb (it used to be when the
    # first score arrived, under Beam's traceback); before that, the flags took the place of the
    # label `flags`, whose scores were lost while the run succeeded.
    _one_line_refusal(result, "label 'flags' clashes with the scores table's own column")
    client = bq.rest_client(bigquery_emulator.settings(), PROJECT)
    try:
        assert "scores" not in {t.table_id for t in client.list_tables(bq_dataset)}
    finally:
        client.close()


@pytest.mark.slow
def test_the_page_shows_hostile_label_names_as_text(start_model_server, start_api, browser, tmp_path: Path) -> None:
    """A model exported elsewhere may name an output anything TensorFlow takes: markup, `__proto__`.
    The page draws names with textContent, so they stay text (this held before; kept as a guard)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.fixtures.models import export_test_model

    labels = ("<img src=x onerror=window.pwned=1>", "__proto__", "constructor", "spam")
    export_test_model(tmp_path / "m", 1, labels=labels)
    api = start_api(model_server=start_model_server(tmp_path / "m"))
    browser.get(api.base_url + "/")
    comment = browser.find_element(By.ID, "comment")
    comment.send_keys("x")  # a text the test model flags for some labels
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "status"), "Scored."))
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    assert {li.get_attribute("data-label") for li in bars} == set(labels)
    shown = {li.find_element(By.CSS_SELECTOR, ".label").get_attribute("textContent") for li in bars}  # before CSS capitalises it
    assert shown == {label.replace("_", " ") for label in labels}
    assert not browser.find_elements(By.CSS_SELECTOR, "#result img")
    assert browser.execute_script("return window.pwned === undefined")


def test_esp_score_prints_a_models_label_names_without_their_control_characters(tmp_path: Path) -> None:
    """A label named with an escape sequence or a newline (TensorFlow takes any output key) must not
    drive the terminal or break the table `esp score` prints."""
    from tests.fixtures.models import export_test_model

    export_test_model(tmp_path / "m", 1, labels=("clear\x1b[2Jscreen", "two\nlines", "spam"))
    result = _esp("score", "--saved-model", str(tmp_path / "m" / "1"), "hello there")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b" not in result.stdout
    header = result.stdout.splitlines()[1]
    assert "clear\\x1b[2Jscreen" in header and "two\\nlines" in header and "spam" in header
