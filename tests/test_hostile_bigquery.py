"""`esp backfill` from and to BigQuery when rows, tables and queries are hostile (bqemulator, DirectRunner).

A row can be anything a warehouse holds; a table that already exists can have any schema; a query can
return anything. The promise: every row is scored or dead-lettered with its reason, the run does not
stop because of one row, and a wrong table or query is one line and a non-zero exit before anything runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from beam_jobs import bigquery as bq
from beam_jobs.backfill import run
from esp.contracts import MAX_ID_CHARS
from tests.fixtures.models import TEST_LABELS
from tests.test_backfill_bigquery import _cli, _client, _config, _query


def _create(emulator: Any, table: str, schema: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    from google.cloud import bigquery

    client = _client(emulator)
    try:
        client.create_table(bigquery.Table(table, schema=[bigquery.SchemaField(n, t, mode=m) for n, t, m in schema]))
        return _schema(emulator, table)
    finally:
        client.close()


def _schema(emulator: Any, table: str) -> list[tuple[str, str, str]]:
    client = _client(emulator)
    try:
        return [(f.name, f.field_type, f.mode) for f in client.get_table(table).schema]
    finally:
        client.close()


def _cli_args(emulator: Any, model: Path) -> list[str]:
    return ["--backend", "saved_model", "--saved-model-dir", str(model),
            "--bigquery-api-endpoint", emulator.api_endpoint,
            "--bigquery-storage-endpoint", emulator.storage_endpoint, "--runner=DirectRunner"]  # fmt: skip


def _one_line_refusal(result: Any, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [x for x in result.stderr.strip().splitlines() if x.startswith("esp: error:")]
    for word in words:
        assert word in line, line


def test_a_row_too_large_for_one_write_is_dead_lettered_and_the_run_goes_on(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path
) -> None:
    source, scores = f"{bq_dataset}.big", f"{bq_dataset}.scores"
    huge = 10_600_000  # its dead letter (the row as JSON) is more than one 10 MB AppendRows request
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'big-1' AS id, REPEAT('a', {huge}) AS text "
                              "UNION ALL SELECT 'ok-1' AS id, 'thank you' AS text")  # fmt: skip

    summary = run(_config(bigquery_emulator, bq_table=source, bq_scores_table=scores, saved_model_dir=str(test_model_base)))
    assert (summary.read, summary.scored, summary.dead_lettered, summary.merged) == (2, 1, 1, 1)
    assert [r["id"] for r in _query(bigquery_emulator, f"SELECT id FROM `{scores}`")] == ["ok-1"]
    [dead] = _query(bigquery_emulator, f"SELECT * FROM `{scores}_dead_letters`")
    assert (dead["id"], dead["error_type"]) == ("big-1", "body_too_large")
    whole = ('{"id": "big-1", "text": "' + "a" * huge + '"}').encode()
    assert len(dead["body"].encode()) <= bq.MAX_DEAD_LETTER_BODY_BYTES and whole.startswith(dead["body"].encode())
    assert str(len(whole)) in dead["reason"] and hashlib.sha256(whole).hexdigest() in dead["reason"]


def test_an_id_too_large_for_one_write_is_dead_lettered_and_the_run_goes_on(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path
) -> None:
    """The same for a huge id: the dead letter's id column keeps only an id the contract could take."""
    source, scores = f"{bq_dataset}.big", f"{bq_dataset}.scores"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT REPEAT('i', 10600000) AS id, 'hello' AS text "
                              "UNION ALL SELECT 'ok-1' AS id, 'thank you' AS text "
                              f"UNION ALL SELECT REPEAT('j', {MAX_ID_CHARS + 1}) AS id, 'hello' AS text")  # fmt: skip

    summary = run(_config(bigquery_emulator, bq_table=source, bq_scores_table=scores, saved_model_dir=str(test_model_base)))
    assert (summary.read, summary.scored, summary.dead_lettered, summary.merged) == (3, 1, 2, 1)
    dead = _query(bigquery_emulator, f"SELECT id, error_type, body FROM `{scores}_dead_letters`")
    assert sorted((d["id"], d["error_type"], d["body"][8]) for d in dead) == [(None, "invalid_id", "i"), (None, "invalid_id", "j")]


# A scores table as ESP makes one for the test model; each case below spoils one column of it.
SCORES_SCHEMA = [
    ("id", "STRING", "REQUIRED"), *((label, "FLOAT", "NULLABLE") for label in TEST_LABELS), ("flags", "STRING", "REPEATED"),
    ("truncated", "BOOLEAN", "NULLABLE"), ("model_name", "STRING", "NULLABLE"), ("model_version", "INTEGER", "REQUIRED"),
    ("scored_at", "TIMESTAMP", "REQUIRED"), ("run_id", "STRING", "NULLABLE"),
]  # fmt: skip


def _spoilt(name: str, column: tuple[str, str, str] | None) -> list[tuple[str, str, str]]:
    """SCORES_SCHEMA with the column `name` replaced by `column` (None: left out; a new name: added)."""
    schema = [c for c in SCORES_SCHEMA if c[0] != name]
    return schema + [column] if column else schema


@pytest.mark.parametrize(
    "schema, named",
    [
        # flags must be ARRAY<STRING>, not a plain STRING.
        (_spoilt("flags", ("flags", "STRING", "NULLABLE")), "flags"),
        # An older table without flags: added as a plain column it would not take the scores either.
        (_spoilt("flags", None), "flags"),
        # A REQUIRED column the scores never fill: every INSERT of the MERGE fails.
        (_spoilt("tenant", ("tenant", "STRING", "REQUIRED")), "tenant"),
        (_spoilt("scored_at", ("scored_at", "STRING", "NULLABLE")), "scored_at"),
        (_spoilt("id", ("id", "INTEGER", "REQUIRED")), "id"),
        (_spoilt("model_version", None), "model_version"),
    ],
)
def test_an_existing_scores_table_that_cannot_take_the_scores_is_refused_before_the_run(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path, schema: list, named: str
) -> None:
    source, scores = f"{bq_dataset}.src", f"{bq_dataset}.scores"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, 'hello' AS text")
    before = _create(bigquery_emulator, scores, schema)
    result = _cli("--bq-table", source, "--bq-scores-table", scores, *_cli_args(bigquery_emulator, test_model_base), timeout=120)
    _one_line_refusal(result, scores, named)
    assert _schema(bigquery_emulator, scores) == before, "the table is left as it was"


@pytest.mark.parametrize("upper", [False, True])
def test_an_existing_scores_table_that_can_take_the_scores_is_merged_into(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path, upper: bool
) -> None:
    """The control for the test above: the same table, unspoilt; also with its columns in capitals,
    which BigQuery takes for the same names (a REQUIRED `ID` is the `id` every row fills)."""
    source, scores = f"{bq_dataset}.src", f"{bq_dataset}.scores"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, 'hello' AS text")
    _create(bigquery_emulator, scores, [(n.upper() if upper else n, t, m) for n, t, m in SCORES_SCHEMA])
    result = _cli("--bq-table", source, "--bq-scores-table", scores, *_cli_args(bigquery_emulator, test_model_base))
    assert result.returncode == 0 and "merged 1" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("which", ["scores", "scores_dead_letters"])
def test_a_view_in_place_of_the_scores_or_dead_letters_table_is_refused_before_the_run(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path, which: str
) -> None:
    """A view over a table of the right schema passes every column check, and cannot be written."""
    source, scores = f"{bq_dataset}.src", f"{bq_dataset}.scores"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, '   ' AS text UNION ALL SELECT 'b', 'hello'")
    schema = SCORES_SCHEMA if which == "scores" else [(c.name, c.type, c.mode) for c in bq.DEAD_LETTER_SCHEMA]
    _create(bigquery_emulator, f"{bq_dataset}.underneath", schema)
    _query(bigquery_emulator, f"CREATE VIEW `{bq_dataset}.{which}` AS SELECT * FROM `{bq_dataset}.underneath`")
    result = _cli("--bq-table", source, "--bq-scores-table", scores, *_cli_args(bigquery_emulator, test_model_base), timeout=120)
    _one_line_refusal(result, f"{bq_dataset}.{which}", "VIEW")


def test_an_existing_dead_letters_table_of_another_schema_is_refused_before_the_run(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path
) -> None:
    source, scores = f"{bq_dataset}.src", f"{bq_dataset}.scores"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, '   ' AS text")  # a dead letter
    dead = _create(bigquery_emulator, f"{scores}_dead_letters", [("id", "STRING", "NULLABLE"), ("reason", "INT64", "NULLABLE")])
    result = _cli("--bq-table", source, "--bq-scores-table", scores, *_cli_args(bigquery_emulator, test_model_base), timeout=120)
    _one_line_refusal(result, f"{scores}_dead_letters", "reason")
    assert _schema(bigquery_emulator, f"{scores}_dead_letters") == dead


@pytest.mark.parametrize(
    "query, words",
    [
        ("SELECT id FROM `{src}`", ["--bq-query", "no column text"]),
        ("SELECT id AS text, text AS body FROM `{src}`", ["--bq-query", "no column id"]),
        ("SELEC id, text FROM `{src}`", ["--bq-query"]),
    ],
)
def test_a_query_that_fails_or_lacks_the_columns_is_one_line_before_the_run(
    bigquery_emulator: Any, bq_dataset: str, test_model_base: Path, query: str, words: list[str]
) -> None:
    source = f"{bq_dataset}.src"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, 'hello' AS text")
    args = ["--bq-query", query.format(src=source), "--bq-scores-table", f"{bq_dataset}.scores"]
    _one_line_refusal(_cli(*args, *_cli_args(bigquery_emulator, test_model_base), timeout=120), *words)
    client = _client(bigquery_emulator)
    assert {t.table_id for t in client.list_tables(bq_dataset)} == {"src"}, "nothing was created"
    client.close()


def test_a_query_that_returns_no_rows_finishes_cleanly(bigquery_emulator: Any, bq_dataset: str, test_model_base: Path) -> None:
    source = f"{bq_dataset}.src"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, 'hello' AS text")
    args = ["--bq-query", f"SELECT id, text FROM `{source}` WHERE FALSE", "--bq-scores-table", f"{bq_dataset}.scores"]
    result = _cli(*args, *_cli_args(bigquery_emulator, test_model_base))
    assert result.returncode == 0 and "read 0, scored 0, dead-lettered 0" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("backend", ["tfserving", "saved_model"])
@pytest.mark.parametrize("threat, refused", [(("threat", "STRING", "NULLABLE"), True), (None, False)])
def test_a_label_column_of_another_type_is_refused_before_the_run(
    bigquery_emulator: Any, bq_dataset: str, model_server: Any, test_model_base: Path, threat: tuple | None, refused: bool,
    backend: str,
) -> None:
    """A scores table whose `threat` column is a STRING takes no score: the run used to score
    everything and fail at the MERGE, with a traceback. The pre-flight asks the model server for the
    labels, or reads them from the SavedModel's saved_model.pb, and refuses in one line; a label column
    the table lacks is no reason to refuse (it is added before the MERGE: the control)."""
    source, scores = f"{bq_dataset}.src", f"{bq_dataset}.scores"
    _query(bigquery_emulator, f"CREATE TABLE `{source}` AS SELECT 'a' AS id, 'hello' AS text")
    before = _create(bigquery_emulator, scores, _spoilt("threat", threat))
    model = ["--model-server", model_server.target] if backend == "tfserving" else ["--saved-model-dir", str(test_model_base)]
    args = ["--backend", backend, *model, "--bigquery-api-endpoint", bigquery_emulator.api_endpoint,
            "--bigquery-storage-endpoint", bigquery_emulator.storage_endpoint, "--runner=DirectRunner"]  # fmt: skip
    if refused:
        result = _cli("--bq-table", source, "--bq-scores-table", scores, *args, timeout=120)
        _one_line_refusal(result, scores, "threat")
        assert _schema(bigquery_emulator, scores) == before, "the table is left as it was"
    else:
        # The pre-flight alone: bqemulator cannot add a column to an existing table (docs/backfill.md).
        from beam_jobs.backfill import preflight
        from esp.settings import ModelClientSettings

        preflight(_config(bigquery_emulator, bq_table=source, bq_scores_table=scores, backend=backend,
                          saved_model_dir=str(test_model_base), client=ModelClientSettings(model_server=model_server.target)))  # fmt: skip
