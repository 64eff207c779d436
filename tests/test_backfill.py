"""The Beam backfill on the DirectRunner: the same scores as the in-process model, through TF
Serving over real gRPC and in process; poison and model-rejected comments to dead letters."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from beam_jobs.backfill import GROUPING_WINDOW, BackfillConfig, ScorerModelHandler, run
from esp.contracts import Comment, Score
from esp.scoring import CANARY_TEXTS
from esp.settings import ModelClientSettings
from serving.saved_model import SavedModelScorer
from tests.fixtures.models import export_test_model

TEXTS = ["thank you for the fix", "you are an idiot", "Ω кириллица 中文 🙂", "x " * 3000, "short"]
POISON = ['{"id": "p1", "text": ', '{"id": "p2"}', '{"id": 3, "text": "numeric id"}']


def _write_input(path: Path, n: int, extra: list[str] = ()) -> dict[str, str]:  # type: ignore[assignment]
    comments = {f"c{i:03d}": f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(n)}
    lines = [json.dumps({"id": cid, "text": text}, ensure_ascii=False) for cid, text in comments.items()]
    path.write_text("\n".join(lines + list(extra)) + "\n", encoding="utf-8")
    return comments


def _read(output: Path, prefix: str) -> list[dict]:
    return [json.loads(line) for f in sorted(output.glob(f"{prefix}*.jsonl")) for line in f.read_text().splitlines() if line]


def _expected(base: Path, comments: dict[str, str]) -> dict[str, dict[str, float]]:
    scorer = SavedModelScorer(base)
    out = scorer.predict(list(comments.values()))
    return {cid: dict(zip(out.labels, row)) for cid, row in zip(comments, out.probabilities)}


def test_backfill_through_tf_serving_matches_the_model(tmp_path: Path, model_server, test_model_base: Path) -> None:  # type: ignore[no-untyped-def]
    comments = _write_input(tmp_path / "in.jsonl", 120, POISON)
    config = BackfillConfig(
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out"),
        client=ModelClientSettings(model_server=model_server.target),
        max_batch_size=16,
    )
    summary = run(config)
    scores = {r["id"]: r for r in _read(tmp_path / "out", "scores")}
    assert set(scores) == set(comments)
    expected = _expected(test_model_base, comments)
    for cid, record in scores.items():
        assert record["scores"] == pytest.approx(expected[cid], abs=1e-5)
        assert record["model"] == {"name": "bert", "version": 1}
    dead = _read(tmp_path / "out", "dead-letters")
    assert sorted((d["esp_stage"], d["esp_error_type"]) for d in dead) == [
        ("validate", "invalid_id"), ("validate", "invalid_json"), ("validate", "missing_text"),
    ]
    assert {d["body"] for d in dead} == set(POISON)
    assert (summary.read, summary.scored, summary.dead_lettered) == (123, 120, 3)


class _RecordingScorer:
    """The real model, recording the texts of each call."""

    def __init__(self, scorer: SavedModelScorer) -> None:
        self.scorer, self.calls = scorer, []  # type: ignore[var-annotated]

    def predict(self, texts):  # type: ignore[no-untyped-def]
        self.calls.append(list(texts))
        return self.scorer.predict(texts)


def test_model_handler_scores_length_sorted_batches_and_answers_in_input_order(test_model_base: Path) -> None:
    # Beam's own length buckets do nothing on a bounded pipeline; the handler must sort its window itself.
    handler = ScorerModelHandler(BackfillConfig(input="unused", output="unused", backend="saved_model",
                                                saved_model_dir=str(test_model_base), max_batch_size=8))
    assert handler.batch_elements_kwargs() == {"min_batch_size": GROUPING_WINDOW, "max_batch_size": GROUPING_WINDOW}
    rng = random.Random(7)
    window = [Comment(id=f"c{i}", text="word " * rng.randint(1, 60)) for i in range(50)]
    model = _RecordingScorer(SavedModelScorer(test_model_base))
    results = list(handler.run_inference(window, model))

    batches = [call for call in model.calls if call != list(CANARY_TEXTS)]
    assert [len(b) for b in batches] == [8] * 6 + [2]
    assert [t for b in batches for t in b] == sorted((c.text for c in window), key=len), "each call a run of the sorted window"
    assert [r.example for r in results] == window
    expected = model.scorer.predict([c.text for c in window]).probabilities
    for result, row in zip(results, expected):
        assert isinstance(result.inference, Score) and result.inference.id == result.example.id
        assert list(result.inference.probabilities.values()) == pytest.approx(list(row), abs=1e-5)


def test_backfill_in_process_isolates_a_rejected_comment(tmp_path: Path) -> None:
    base = tmp_path / "rejecting"
    export_test_model(base, 1, reject_marker="POISON")
    comments = _write_input(tmp_path / "in.jsonl", 40)
    with open(tmp_path / "in.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "bad-1", "text": "this one is POISON for the model"}) + "\n")
    run(BackfillConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), backend="saved_model",
                       saved_model_dir=str(base), max_batch_size=8))
    scores = {r["id"] for r in _read(tmp_path / "out", "scores")}
    assert scores == set(comments), "the rejected comment's batch neighbours are all scored"
    (dead,) = _read(tmp_path / "out", "dead-letters")
    assert (dead["esp_stage"], dead["esp_error_type"]) == ("score", "model_rejected")
    assert json.loads(dead["body"])["id"] == "bad-1" and dead["esp_reason"]


def test_cli_reports_and_exits_nonzero_on_dead_letters(tmp_path: Path, test_model_base: Path) -> None:
    _write_input(tmp_path / "in.jsonl", 10, POISON[:1])
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "backfill", "--input", str(tmp_path / "in.jsonl"),
         "--output", str(tmp_path / "out"), "--backend", "saved_model", "--saved-model-dir", str(test_model_base),
         "--progress-interval-s", "0.001", "--runner=DirectRunner"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "read 11, scored 10, dead-lettered 1 in" in result.stdout
    assert "backfill progress (pid" in result.stderr and "scored/s" in result.stderr, "progress while it runs"


def test_invalid_utf8_line_is_dead_lettered_with_its_exact_bytes(tmp_path: Path, test_model_base: Path) -> None:
    import base64

    _write_input(tmp_path / "in.jsonl", 5)
    bad = b'{"id": "u1", "text": "caf\xe9"}'
    with open(tmp_path / "in.jsonl", "ab") as f:
        f.write(bad + b"\n\n")
    summary = run(BackfillConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), backend="saved_model",
                                 saved_model_dir=str(test_model_base)))
    assert (summary.read, summary.scored, summary.dead_lettered) == (6, 5, 1)
    (dead,) = _read(tmp_path / "out", "dead-letters")
    assert dead["esp_error_type"] == "invalid_utf8"
    assert base64.b64decode(dead["body_base64"]) == bad


def test_cli_refuses_bad_combinations_in_one_line(tmp_path: Path) -> None:
    cases = [
        (["--output", str(tmp_path)], "exactly one source"),
        (["--input", str(tmp_path / "none-*.jsonl"), "--output", str(tmp_path)], "matches no file"),
        (["--input", "x.jsonl", "--bq-table", "p1.d.t", "--output", str(tmp_path)], "exactly one source"),
        (["--input", "x.jsonl"], "somewhere to put the scores"),
        (["--input", "x.jsonl", "--publish-scores"], "nowhere for dead letters"),
        (["--bq-query", "SELECT 1", "--output", str(tmp_path), "--bigquery-project", "my-proj"], "dataset for its result"),
        (["--bq-table", "not-a-table", "--output", str(tmp_path)], "PROJECT.DATASET.TABLE"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "esp.cli.main", "backfill", *args, "--backend", "saved_model",
                                 "--saved-model-dir", str(tmp_path), "--runner=DirectRunner"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr[-2000:])


def test_cli_refuses_a_saved_model_it_cannot_read_in_one_line(tmp_path: Path, test_model_base: Path) -> None:
    """The pre-flight reads the SavedModel's labels from saved_model.pb. Before, an empty or garbled
    model directory, or a signature the model lacks, started the job and ended in Beam's traceback."""
    _write_input(tmp_path / "in.jsonl", 3)
    garbled = tmp_path / "garbled" / "1"
    garbled.mkdir(parents=True)
    (garbled / "saved_model.pb").write_bytes(b"\xff" * 64)
    cases = [
        ([str(tmp_path / "empty")], "no model version"),
        ([str(garbled.parent)], "cannot be read"),
        ([str(test_model_base), "--model-signature", "nope"], "no signature 'nope'"),
        ([str(test_model_base), "--model-version", "7"], "no version 7"),
        ([str(tmp_path / ("a" * 300))], "File name too long"),  # an OSError from the first stat: was a traceback
    ]
    (tmp_path / "empty").mkdir()
    for model, message in cases:
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, "-m", "esp.cli.main", "backfill", "--input", str(tmp_path / "in.jsonl"),
                                 "--output", str(out), "--backend", "saved_model", "--saved-model-dir", *model,
                                 "--runner=DirectRunner"], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert result.returncode == 2, (model, result.stderr[-2000:])
        [line] = [x for x in result.stderr.strip().splitlines() if x.startswith("esp: error:")]
        assert "--saved-model-dir" in line and message in line and "Traceback" not in result.stderr, (model, result.stderr[-2000:])
        assert not out.exists(), "nothing ran"


def test_the_saved_model_pre_flight_refuses_without_loading_tensorflow(tmp_path: Path, test_model_base: Path) -> None:
    """Importing TensorFlow made a refused backfill take 11.5 s instead of 3.0 (docs/backfill.md): the
    pre-flight reads saved_model.pb with ESP's own message, and TensorFlow loads only for a job that runs."""
    _write_input(tmp_path / "in.jsonl", 3)
    argv = ["esp", "backfill", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--backend",
            "saved_model", "--saved-model-dir", str(test_model_base), "--model-signature", "nope", "--runner=DirectRunner"]
    script = ("import sys\nfrom esp.cli.main import main\nsys.argv = " + repr(argv) + "\ntry:\n    main()\n"
              "except SystemExit as exc:\n    print(exc.code, 'tensorflow' in sys.modules)\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr[-2000:]
    assert "no signature 'nope'" in result.stderr, result.stderr[-2000:]
