"""A new endpoint from a new dataset ("Add ML Endpoint"): a small second task the test generates
(support tickets labelled `spam` and `urgent`, a CSV with no id column) goes through `esp
prepare-data` and `esp train` under its own model name, then is served by `esp serve` and scored
through the worker, end to end. Nothing downstream knows the labels in advance: they come from the
model's signature."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.local import ModelServerProcess
from tests.fixtures.model_server import model_client_settings
from tests.fixtures.worker import Stream, fast_worker_settings
from worker.local import WorkerProcess

pytestmark = pytest.mark.slow

LABELS = ("spam", "urgent")
SPAM = ["buy cheap watches now", "click this link to win a prize", "limited offer, free gift card", "earn money fast from home",
        "cheap pills without prescription", "you have won a lottery, send your bank details"]
URGENT = ["the production server is down", "customers cannot log in since this morning", "payment processing fails for everyone",
          "data loss after the last update", "security breach reported on the admin account", "the checkout page crashes immediately"]
PLAIN = ["how do I change my avatar", "thanks for the quick answer yesterday", "could you add a dark mode some day",
         "where can I find the invoice from march", "the documentation has a typo on page three", "is there a student discount"]
FILLER = ["hello team", "hi", "good morning", "dear support", "hey there", "greetings"]


def ticket_rows(n: int, seed: int = 3) -> list[dict]:
    """Tickets whose labels follow from their text (with a little label noise), each text unique."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        spam, urgent = rng.random() < 0.3, rng.random() < 0.3
        parts = [rng.choice(FILLER)]
        parts += [rng.choice(SPAM)] if spam else []
        parts += [rng.choice(URGENT)] if urgent else []
        parts += [rng.choice(PLAIN)] if not (spam or urgent) or rng.random() < 0.5 else []
        parts.append(f"ticket number {i} from user {rng.randrange(10**6)}")
        flip = rng.random() < 0.03
        rows.append({"body": ". ".join(parts), "spam": int(spam != flip), "urgent": int(urgent)})
    return rows


def _esp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    return subprocess.run([sys.executable, "-m", "esp.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tickets_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second task, prepared and trained by the CLI exactly as a user would; returns the base path."""
    root = tmp_path_factory.mktemp("tickets")
    source = root / "tickets.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["body", "spam", "urgent"])
        writer.writeheader()
        writer.writerows(ticket_rows(1500))
    data = root / "data"
    prep = _esp("prepare-data", "--input", str(source), "--id-column", "", "--text-column", "body", "--label-columns", "spam,urgent",
                "--data-dir", str(data), "--no-progress", "--runner=DirectRunner")
    assert prep.returncode == 0, prep.stderr[-3000:]
    stats = json.loads((data / "stats.json").read_text())
    assert stats["labels"] == list(LABELS) and stats["rows"]["total"] == 1500 and stats["rejected_total"] == 0
    base = root / "models" / "tickets"
    trained = _esp("train", "--profile", "tiny", "--model-name", "tickets", "--data-dir", str(data), "--export-base-path", str(base),
                   "--work-dir", str(root / "work"), "--report-dir", str(root / "report"), "--no-progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "as model tickets" in trained.stdout
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert set(metrics["model"]["roc_auc"]) == set(LABELS)
    assert "profanity_check" not in metrics  # a toxicity baseline says nothing about these labels
    assert metrics["model"]["mean_roc_auc"] > 0.9, metrics["model"]["roc_auc"]  # it learned the task
    return base


@pytest.mark.timeout(1200)
def test_the_export_carries_the_new_labels_and_name(tickets_model: Path) -> None:
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from tensorflow_serving.apis import prediction_log_pb2

    info = json.loads((tickets_model / "1" / "assets.extra" / "esp_model_info.json").read_text())
    assert info["labels"] == list(LABELS) and info["model_name"] == "tickets"
    assert set(info["thresholds"]) == set(LABELS)
    fn = tf.saved_model.load(str(tickets_model / "1")).signatures["serving_default"]
    assert set(fn.structured_outputs) == {"spam", "urgent", "esp_threshold_spam", "esp_threshold_urgent", "esp_truncated"}
    # TF Serving replays the warmup requests against the model they name.
    record = next(iter(tf.data.TFRecordDataset(str(tickets_model / "1" / "assets.extra" / "tf_serving_warmup_requests"))))
    log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    assert log.predict_log.request.model_spec.name == "tickets"


@pytest.mark.timeout(1200)
def test_the_worker_scores_the_second_task_under_its_own_model_name(
    tickets_model: Path, stream: Stream, start_model_server: Callable[..., ModelServerProcess], start_worker: Callable[..., WorkerProcess]
) -> None:
    from serving.saved_model import SavedModelScorer

    server = start_model_server(tickets_model, model_name="tickets")
    start_worker(stream.settings, model_client_settings(server, model_name="tickets"), *fast_worker_settings(worker_id="tickets-worker"))
    rows = ticket_rows(60, seed=99)
    comments = [(f"t-{i}", r["body"]) for i, r in enumerate(rows)]
    stream.publish_comments(comments)
    stream.collect(scores=len(comments), timeout_s=120)

    records = {rec["id"]: rec for rec in stream.score_records()}
    assert set(records) == {cid for cid, _ in comments}
    expected = SavedModelScorer(tickets_model, model_name="tickets").predict([text for _, text in comments])
    assert expected.labels == LABELS
    hits = 0
    for (cid, _), row, truth in zip(comments, expected.probabilities, rows):
        rec = records[cid]
        assert rec["model"] == {"name": "tickets", "version": 1}
        assert set(rec["scores"]) == set(LABELS)
        for label, p in zip(expected.labels, row):
            assert abs(rec["scores"][label] - float(p)) <= 1e-5
        assert rec["flags"] == [l for l, p in zip(expected.labels, row) if p >= expected.thresholds[l]]
        hits += (rec["scores"]["spam"] >= 0.5) == bool(truth["spam"])
    assert hits >= 45, f"only {hits} of 60 spam calls right"
