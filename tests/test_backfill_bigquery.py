"""The backfill against a real local BigQuery (bqemulator: REST + Storage Read/Write over gRPC).

A table or a query in, read through a Storage Read session split into streams; the scores table out
through PENDING write streams, a staging table and one MERGE; dead letters in their own table.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from beam_jobs import bigquery as bq
from beam_jobs.backfill import BackfillConfig, run
from esp.settings import BackfillSettings
from serving.saved_model import SavedModelScorer
from tests.fixtures.bigquery import PROJECT
from tests.fixtures.models import TEST_LABELS, TEST_THRESHOLDS, export_test_model

TEXTS = ["thank you for the fix", "you are an idiot", "Ω кириллица 中文 🙂", "x " * 300, "short and sweet"]


def _client(emulator: Any) -> Any:
    return bq.rest_client(emulator.settings(), PROJECT)


def _seed(emulator: Any, table: str, rows: list[dict], schema: list[tuple[str, str]]) -> None:
    """Source rows through the REST insertAll path, not through the code under test."""
    from google.cloud import bigquery

    client = _client(emulator)
    try:
        client.create_table(bigquery.Table(table, schema=[bigquery.SchemaField(n, t) for n, t in schema]))
        for start in range(0, len(rows), 500):
            errors = client.insert_rows_json(table, rows[start : start + 500])
            assert not errors, errors
    finally:
        client.close()


def _query(emulator: Any, sql: str) -> list[dict]:
    client = _client(emulator)
    try:
        return [dict(row) for row in client.query(sql).result()]
    finally:
        client.close()


def _comments(n: int, prefix: str = "c", repeat: int = 1) -> dict[str, str]:
    return {f"{prefix}{i:05d}": f"{TEXTS[i % len(TEXTS)]} " * repeat + f"#{i}" for i in range(n)}


def _expected(base: Path, comments: dict[str, str], version: int | None = None) -> dict[str, dict[str, float]]:
    out = SavedModelScorer(base, version=version).predict(list(comments.values()))
    return {cid: dict(zip(out.labels, row)) for cid, row in zip(comments, out.probabilities)}


def _config(emulator: Any, **kwargs: Any) -> BackfillConfig:
    values: dict[str, Any] = dict(
        backend="saved_model", max_batch_size=16, bigquery=emulator.settings(bigquery_max_read_streams=4)
    )
    values.update(kwargs)
    return BackfillConfig(**values)


POISON_ROWS = [
    {"id": "p-empty", "text": "   "},
    {"id": None, "text": "no id at all"},
    {"id": "p-null-text", "text": None},
    {"id": "", "text": "empty id"},
]


def test_table_in_scores_table_out(bigquery_emulator, bq_dataset: str, test_model_base: Path) -> None:
    comments = _comments(3000, repeat=4)  # over 1 MB: the emulator, like BigQuery, splits it into several streams
    source = f"{bq_dataset}.comments"
    rows = [{"id": cid, "text": text} for cid, text in comments.items()] + POISON_ROWS
    _seed(bigquery_emulator, source, rows, [("id", "STRING"), ("text", "STRING")])

    # max_read_streams=0 lets BigQuery choose; the emulator takes 0 as 1, so ask for 4 here.
    plan = list(bq.PlanRead(bigquery_emulator.settings(bigquery_max_read_streams=4), PROJECT, 1).process(
        bq.BigQuerySource("id", "text", table=bq.TableRef.parse(source))))
    assert len(plan) > 1, "the read session is split into streams, read in parallel after a Reshuffle"

    scores_table = f"{bq_dataset}.scores"
    summary = run(_config(bigquery_emulator, bq_table=source, bq_scores_table=scores_table,
                          saved_model_dir=str(test_model_base)))
    assert (summary.read, summary.scored, summary.dead_lettered, summary.merged) == (3004, 3000, 4, 3000)

    client = _client(bigquery_emulator)
    table = client.get_table(scores_table)
    names = [f.name for f in table.schema]
    labels = SavedModelScorer(test_model_base).labels  # the signature's labels, in its order
    assert sorted(labels) == sorted(TEST_LABELS)
    assert names == ["id", *labels, "flags", "truncated", "model_name", "model_version", "scored_at", "run_id"]
    assert table.time_partitioning.field == "scored_at" and table.time_partitioning.type_ == "DAY"
    assert table.clustering_fields == ["model_version", "id"]
    tables = {t.table_id for t in client.list_tables(bq_dataset)}
    assert tables == {"comments", "scores", "scores_dead_letters"}, "the staging table is dropped"
    client.close()

    got = {r["id"]: r for r in _query(bigquery_emulator, f"SELECT * FROM `{scores_table}`")}
    assert set(got) == set(comments)
    expected = _expected(test_model_base, comments)
    for cid, row in got.items():
        assert {label: row[label] for label in TEST_LABELS} == pytest.approx(expected[cid], abs=1e-5)
        assert (row["model_name"], row["model_version"]) == ("bert", 1)
        assert row["flags"] == [l for l in labels if row[l] >= TEST_THRESHOLDS[l]]

    dead = _query(bigquery_emulator, f"SELECT * FROM `{scores_table}_dead_letters`")
    assert sorted(d["error_type"] for d in dead) == ["empty_text", "invalid_id", "missing_id", "missing_text"]
    assert all(d["stage"] == "validate" and d["reason"] and d["source"] == source for d in dead)
    assert {json.loads(d["body"])["id"] for d in dead} == {"p-empty", None, "p-null-text", ""}


def test_rerun_replaces_its_rows_even_on_another_day(bigquery_emulator, bq_dataset: str, tmp_path: Path) -> None:
    base = tmp_path / "bert"
    export_test_model(base, 1)
    export_test_model(base, 2, bias=1.5)
    comments = _comments(200)
    source, scores = f"{bq_dataset}.comments", f"{bq_dataset}.scores"
    _seed(bigquery_emulator, source, [{"id": c, "text": t} for c, t in comments.items()], [("id", "STRING"), ("text", "STRING")])

    first = _config(bigquery_emulator, bq_table=source, bq_scores_table=scores, saved_model_dir=str(base),
                    client=_client_settings(version=1))
    run(first)
    # Pretend the first run happened on another day, and that its rows were since damaged.
    _query(bigquery_emulator, f"UPDATE `{scores}` SET scored_at = TIMESTAMP '2020-01-01 00:00:00+00', toxic = -1.0 WHERE TRUE")

    again = _config(bigquery_emulator, bq_table=source, bq_scores_table=scores, saved_model_dir=str(base),
                    client=_client_settings(version=1))
    summary = run(again)
    assert summary.merged == 200
    rows = _query(bigquery_emulator, f"SELECT * FROM `{scores}`")
    assert len(rows) == 200, "same input, same model version: replaced, not added"
    assert {r["run_id"] for r in rows} == {again.run_id}
    assert all(r["scored_at"].date() >= dt.date.today() - dt.timedelta(days=1) for r in rows)
    expected = _expected(base, comments, version=1)
    assert all(r["toxic"] == pytest.approx(expected[r["id"]]["toxic"], abs=1e-5) for r in rows)

    run(_config(bigquery_emulator, bq_table=source, bq_scores_table=scores, saved_model_dir=str(base),
                client=_client_settings(version=2)))
    by_version = _query(bigquery_emulator, f"SELECT model_version, COUNT(*) AS n FROM `{scores}` GROUP BY model_version ORDER BY 1")
    assert by_version == [{"model_version": 1, "n": 200}, {"model_version": 2, "n": 200}]


def _client_settings(**kwargs: Any) -> Any:
    from esp.settings import ModelClientSettings

    return ModelClientSettings(model_version=kwargs["version"])


def test_query_source_with_integer_ids_and_duplicates(bigquery_emulator, bq_dataset: str, test_model_base: Path) -> None:
    source = f"{bq_dataset}.history"
    rows = [{"comment_id": i, "body": f"{TEXTS[i % 5]} {i}", "lang": "en" if i % 2 else "fr"} for i in range(120)]
    rows.append({"comment_id": 7, "body": f"{TEXTS[7 % 5]} 7", "lang": "en"})  # the same comment twice in history
    _seed(bigquery_emulator, source, rows, [("comment_id", "INT64"), ("body", "STRING"), ("lang", "STRING")])
    scores = f"{bq_dataset}.scores"
    config = _config(
        bigquery_emulator,
        bq_query=f"SELECT comment_id, body FROM `{source}` WHERE lang = 'en';",
        bq_scores_table=scores,
        saved_model_dir=str(test_model_base),
        backfill=BackfillSettings(id_column="comment_id", text_column="body"),
    )
    summary = run(config)
    assert (summary.read, summary.scored, summary.merged) == (61, 61, 60)
    got = {r["id"] for r in _query(bigquery_emulator, f"SELECT id FROM `{scores}`")}
    assert got == {str(i) for i in range(1, 120, 2)}, "INT64 ids are read as their decimal strings"
    client = _client(bigquery_emulator)
    assert {t.table_id for t in client.list_tables(bq_dataset)} == {"history", "scores", "scores_dead_letters"}
    client.close()


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esp.cli.main", "backfill", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_names_a_missing_table_or_column_in_one_line(bigquery_emulator, bq_dataset: str, test_model_base: Path) -> None:
    common = ["--backend", "saved_model", "--saved-model-dir", str(test_model_base),
              "--bigquery-api-endpoint", bigquery_emulator.api_endpoint,
              "--bigquery-storage-endpoint", bigquery_emulator.storage_endpoint, "--runner=DirectRunner"]
    result = _cli("--bq-table", f"{bq_dataset}.nope", "--bq-scores-table", f"{bq_dataset}.scores", *common)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nope" in result.stderr.strip().splitlines()[-1]

    _seed(bigquery_emulator, f"{bq_dataset}.src", [{"id": "a", "body": "hello"}], [("id", "STRING"), ("body", "STRING")])
    result = _cli("--bq-table", f"{bq_dataset}.src", "--bq-scores-table", f"{bq_dataset}.scores", *common)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no column text" in result.stderr and "--text-column" in result.stderr

    result = _cli("--bq-table", f"{bq_dataset}.src", "--text-column", "body", "--bq-scores-table", f"{bq_dataset}.scores", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read 1, scored 1, dead-lettered 0, merged 1" in result.stdout
