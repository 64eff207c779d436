"""`esp backfill` from and to BigQuery when rows, tables and queries are hostile (bqemulator, DirectRunner).

A row can be anything a warehouse holds; a table that already exists can have any schema; a query can
return anything. The promise: every row is scored or dead-lettered with its reason, the run does not
stop because of one row, and a wrong table or query is one line and a non-zero exit before anything runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from beam_jobs import bigquery as bq
from beam_jobs.backfill import run
from tests.test_backfill_bigquery import _config, _query


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
