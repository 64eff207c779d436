"""The worker in-process against the real Pub/Sub emulator, with tiny real scorers (tests/fixtures/worker.py).

What goes in comes out exactly once: one score per comment, poison dead-lettered with its reason,
an outage held without a nack, a rejected comment isolated from its neighbours, bounded
outstanding messages, and a drain on stop that loses nothing.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from esp.contracts import DeadLetter, ErrorType, Stage
from esp.localstack import PubSubEmulator, wait_until
from esp.scoring import CANARY_TEXTS
from tests.fixtures.pubsub import unique_settings
from tests.fixtures.worker import (
    LABELS,
    Outage,
    Rejecting,
    Slow,
    Stream,
    SumScorer,
    fast_worker_settings,
    sum_probability,
)
from worker.service import Worker


def sample(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def http(worker: Worker, path: str) -> tuple[int, str]:
    assert worker.health is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.health.port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def start(in_process: Callable[..., Worker], stream: Stream) -> Callable[..., Worker]:
    return lambda scorer, **overrides: in_process(scorer, stream.settings, **overrides)


def test_every_comment_is_scored_exactly_once_with_its_attributes(stream: Stream, start: Callable[..., Worker]) -> None:
    scorer = SumScorer(model_name="fake-bert", model_version=7)
    worker = start(scorer, max_batch_size=16)
    comments = [(f"c-{i}", "word " * (1 + i % 50) + f"#{i}") for i in range(300)]
    message_ids = stream.publish_comments(comments, source="test")
    stream.collect(scores=300)
    stream.quiet(0.5)

    records = {rec["id"]: rec for rec in stream.score_records()}
    assert set(records) == {cid for cid, _ in comments}
    assert len(stream.scores) == 300, "no duplicates without failures"
    texts = dict(comments)
    for cid, rec in records.items():
        for label in LABELS:
            assert rec["scores"][label] == pytest.approx(sum_probability(texts[cid], label), abs=1e-6)
        assert rec["model"] == {"name": "fake-bert", "version": 7}
        assert rec["truncated"] == (len(texts[cid]) > 200)
        assert rec["published_at"] is not None and rec["scored_at"] >= rec["published_at"]
    # Attribute values on the score messages themselves (the emulator does not apply filters).
    for received in stream.scores:
        rec = json.loads(received.message.data)
        attrs = dict(received.message.attributes)
        flagged = any(rec["scores"][label] >= 0.5 for label in LABELS)
        assert attrs == {
            "schema_version": "1",
            "model_name": "fake-bert",
            "model_version": "7",
            "flagged": "true" if flagged else "false",
            "truncated": "true" if rec["truncated"] else "false",
        }
    assert max(scorer.batch_sizes) <= 16
    # Without a probe, the engine asks the canary whether the model answers before pulling.
    assert sum(scorer.batch_sizes) == 300 + worker.engine.canary.checks * len(CANARY_TEXTS)
    assert sample(worker, "esp_messages_total", outcome="scored") == 300
    assert sample(worker, "esp_end_to_end_latency_seconds_count") == 300
    assert len(message_ids) == 300
    wait_until(lambda: worker._ledger.count == 0, timeout_s=5, what="every comment to be acked")


POISON = {
    ErrorType.INVALID_JSON: b'{"id": "p1", "text": "unterminated',
    ErrorType.MISSING_ID: b'{"text": "no id here"}',
    ErrorType.EMPTY_TEXT: b'{"id": "p3", "text": "   "}',
    ErrorType.NON_STRING_TEXT: b'{"id": "p4", "text": 42}',
    ErrorType.BODY_TOO_LARGE: json.dumps({"id": "p5", "text": "x" * 70_000}).encode(),
    ErrorType.INVALID_UTF8: b'{"id": "p6", "text": "caf\xe9"}',
    ErrorType.INVALID_ID: b'{"id": 123, "text": "numeric id"}',
    ErrorType.NOT_AN_OBJECT: b'["p8", "an array"]',
    ErrorType.MISSING_TEXT: b'{"id": "p9"}',
}


def test_poison_is_dead_lettered_with_its_reason_and_neighbours_are_scored(stream: Stream, start: Callable[..., Worker]) -> None:
    worker = start(SumScorer())
    bodies: list[bytes] = []
    valid_ids = []
    for i, body in enumerate(POISON.values()):
        bodies.append(json.dumps({"id": f"ok-{i}a", "text": f"fine comment {i}"}).encode())
        bodies.append(body)
        bodies.append(json.dumps({"id": f"ok-{i}b", "text": f"another fine one {i}"}).encode())
        valid_ids += [f"ok-{i}a", f"ok-{i}b"]
    stream.publish(bodies, origin="matrix")
    stream.collect(scores=len(valid_ids), dead_letters=len(POISON))
    stream.quiet(0.5)

    assert stream.score_ids() == set(valid_ids)
    letters = [DeadLetter.from_pubsub(r.message.data, dict(r.message.attributes)) for r in stream.dead_letters]
    assert len(letters) == len(POISON)
    by_type = {letter.error_type: letter for letter in letters}
    assert set(by_type) == set(POISON)
    for error_type, body in POISON.items():
        letter = by_type[error_type]
        assert letter.data == body, "the original bytes, byte for byte"
        assert letter.attributes == {"origin": "matrix"}, "the original attributes, no esp_* ones"
        assert letter.stage == Stage.VALIDATE
        assert letter.reason and letter.worker == "test-worker" and letter.delivery_attempt == 1
        assert letter.source_subscription == stream.settings.subscription_path(stream.settings.subscription)
    assert "70" in by_type[ErrorType.BODY_TOO_LARGE].reason
    assert sample(worker, "esp_dead_letters_total", reason=ErrorType.INVALID_UTF8) == 1
    assert sample(worker, "esp_messages_total", outcome="dead_lettered") == len(POISON)
    wait_until(lambda: worker._ledger.count == 0, timeout_s=5, what="every message to be acked")


def test_outage_pauses_pulling_and_resumes_without_a_nack(stream: Stream, start: Callable[..., Worker]) -> None:
    # A short outage checks the state machine; test_worker_e2e holds one for 30 s, three ack deadlines.
    scorer = Outage(SumScorer())
    worker = start(scorer)
    stream.publish_comments([(f"a-{i}", f"before the outage {i}") for i in range(40)])
    stream.collect(scores=40)

    scorer.down.set()
    stream.publish_comments([(f"b-{i}", f"during the outage {i}") for i in range(120)])
    wait_until(lambda: not worker.ready(), timeout_s=10, what="the worker to report not ready")
    status, body = http(worker, "/readyz")
    assert status == 503 and "unavailable" in body
    assert http(worker, "/healthz")[0] == 200
    assert sample(worker, "esp_paused", cause="model server") == 1
    pulled_when_paused = sample(worker, "esp_pulled_messages_total")
    wait_until(lambda: scorer.failed_calls >= 5, timeout_s=10, what="retries with backoff")
    assert sample(worker, "esp_pulled_messages_total") <= pulled_when_paused + worker.settings.pull_max_messages
    assert sample(worker, "esp_batch_retries_total") >= 4

    scorer.down.clear()
    stream.collect(scores=160, timeout_s=30)
    wait_until(worker.ready, timeout_s=10, what="the worker to be ready again")
    stream.quiet(0.5)
    assert stream.score_ids() == {f"a-{i}" for i in range(40)} | {f"b-{i}" for i in range(120)}
    assert len(stream.scores) == 160, "no nack, no redelivery, no duplicate"
    assert stream.dead_letters == []
    for outcome in ("nacked_rejected", "nacked_shutdown", "nacked_publish_failed", "dead_lettered"):
        assert sample(worker, "esp_messages_total", outcome=outcome) == 0
    assert sample(worker, "esp_paused", cause="model server") == 0
    assert sample(worker, "esp_paused_seconds_total", cause="model server") > 0


def test_a_rejected_comment_is_isolated_and_dead_lettered_on_its_last_attempt(stream: Stream, start: Callable[..., Worker]) -> None:
    inner = SumScorer()
    worker = start(Rejecting(inner), max_batch_size=8, max_batch_latency_ms=50.0)
    comments = [(f"n-{i}", f"neighbour {i}") for i in range(15)]
    comments.insert(7, ("bad-1", "this one <<REJECT>> breaks the model"))
    stream.publish_comments(comments, kind="mixed")
    stream.collect(scores=15, dead_letters=1, timeout_s=45)
    stream.quiet(1.0)

    assert stream.score_ids() == {f"n-{i}" for i in range(15)}
    assert len(stream.scores) == 15, "neighbours scored once: the bad comment cost them nothing"
    assert len(stream.dead_letters) == 1
    letter = DeadLetter.from_pubsub(stream.dead_letters[0].message.data, dict(stream.dead_letters[0].message.attributes))
    assert letter.kind == "worker", "the worker's own dead letter, with a reason, not the policy's"
    assert letter.stage == Stage.SCORE and letter.error_type == ErrorType.MODEL_REJECTED
    assert "<<REJECT>>" in letter.reason
    assert letter.delivery_attempt == stream.settings.max_delivery_attempts
    assert json.loads(letter.data)["id"] == "bad-1" and letter.attributes == {"kind": "mixed"}
    assert sample(worker, "esp_messages_total", outcome="nacked_rejected") == stream.settings.max_delivery_attempts - 1
    assert sample(worker, "esp_dead_letters_total", reason=ErrorType.MODEL_REJECTED) == 1


def test_outstanding_messages_and_bytes_stay_bounded(stream: Stream, start: Callable[..., Worker]) -> None:
    worker = start(
        Slow(SumScorer(), delay_s=0.05),
        max_batch_size=10,
        max_outstanding_messages=40,
        max_outstanding_bytes=1024 * 1024,
        pull_max_messages=20,
    )
    small = [(f"s-{i}", f"short {i}") for i in range(200)]
    big = [(f"L-{i}", "y" * 60_000) for i in range(40)]  # 40 x 60 KB = 2.4 MB: the bytes bound binds
    stream.publish_comments(small + big)
    stream.collect(scores=240, timeout_s=60)
    peak = {"count": worker._ledger.peak_count, "bytes": worker._ledger.peak_bytes}  # exact, kept by the ledger
    assert peak["count"] <= 40
    # One pull may overshoot the bytes bound by at most pull_max_messages bodies.
    assert peak["bytes"] <= 1024 * 1024 + 20 * 60_100
    assert peak["count"] >= 20, "it did pull in batches"


def test_attributes_count_against_the_bytes_bound(stream: Stream, start: Callable[..., Worker]) -> None:
    # Pub/Sub allows 100 attributes of 1 KB: ~100 KB of message around a 30-byte body. Counting
    # only bodies, a worker bounded to 1 MiB once held all 100 of these (~10 MB).
    worker = start(Slow(SumScorer(), delay_s=0.5), max_outstanding_bytes=1024 * 1024, max_outstanding_messages=200, pull_max_messages=5)
    attributes = {f"a{i:02d}": "v" * 1000 for i in range(100)}
    per_message = 100 * (3 + 1000)
    stream.publish([json.dumps({"id": f"c{i}", "text": "hello"}).encode() for i in range(100)], **attributes)
    stream.collect(scores=100, timeout_s=90)
    peak = {"count": worker._ledger.peak_count, "bytes": worker._ledger.peak_bytes}
    assert peak["bytes"] >= per_message, f"the ledger counted at most {peak['bytes']} bytes for messages of ~{per_message}"
    # The documented bound: max_outstanding_bytes plus one pull (5 messages here).
    assert peak["count"] * per_message <= 1024 * 1024 + 5 * per_message, f"{peak['count']} messages of ~100 KB held at once"


def test_stop_drains_and_a_second_worker_finishes_the_rest(stream: Stream, start: Callable[..., Worker]) -> None:
    first = start(Slow(SumScorer(), delay_s=0.2), max_batch_size=10, shutdown_grace_s=3.0)
    stream.publish_comments([(f"d-{i}", f"drain me {i}") for i in range(300)])
    wait_until(lambda: sample(first, "esp_messages_total", outcome="scored") >= 20, timeout_s=20, what="some scores")
    t0 = time.monotonic()
    first.stop()
    assert time.monotonic() - t0 < 3.0 + 3.0, "stop respects the grace period"
    assert first._ledger.count == 0, "everything held was acked or nacked"
    scored_by_first = sample(first, "esp_messages_total", outcome="scored")
    assert sample(first, "esp_messages_total", outcome="nacked_shutdown") > 0
    assert scored_by_first < 300

    start(SumScorer())
    stream.collect(scores=300, timeout_s=30)
    assert stream.score_ids() == {f"d-{i}" for i in range(300)}
    assert stream.dead_letters == []


def test_http_endpoints(stream: Stream, start: Callable[..., Worker]) -> None:
    worker = start(SumScorer())
    assert http(worker, "/healthz") == (200, "ok\n")
    assert http(worker, "/readyz") == (200, "ready\n")
    stream.publish_comments([("h-1", "hello")])
    stream.collect(scores=1)
    status, body = http(worker, "/metrics")
    assert status == 200
    assert 'esp_messages_total{outcome="scored"} 1.0' in body
    for name in ("esp_batch_size", "esp_batch_latency_seconds", "esp_end_to_end_latency_seconds", "esp_in_flight_messages",
                 "esp_batch_retries_total", "esp_paused", "esp_model_outage"):
        assert name in body
    assert http(worker, "/nope")[0] == 404


@pytest.fixture
def stopped_at_teardown() -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()


def test_not_ready_until_the_model_answers(stream: Stream, stopped_at_teardown: list[Worker]) -> None:
    scorer = Outage(SumScorer())
    scorer.down.set()
    settings, batching = fast_worker_settings()
    worker = Worker(scorer, pubsub=stream.settings, settings=settings, batching=batching, probe=scorer.probe).start()
    stopped_at_teardown.append(worker)
    stream.publish_comments([("r-1", "waiting for the model")])
    # Two failed probes: the worker has had its chance to pull in between, and did not.
    wait_until(lambda: scorer.probes >= 2, timeout_s=10, what="two probes of the model")
    status, body = http(worker, "/readyz")
    assert status == 503 and "model not ready" in body
    assert sample(worker, "esp_pulled_messages_total") == 0, "nothing pulled while the model cannot score it"
    scorer.down.clear()
    wait_until(worker.ready, timeout_s=10, what="readiness once the model answers")
    stream.collect(scores=1)


def test_an_idle_worker_notices_the_model_server_going_away(stream: Stream, start: Callable[..., Worker]) -> None:
    # No traffic, so no batch fails: only the idle probe can tell /readyz the truth.
    scorer = Outage(SumScorer())
    worker = start(scorer, idle_probe_interval_s=0.2)
    assert http(worker, "/readyz")[0] == 200
    scorer.down.set()
    wait_until(lambda: not worker.ready(), timeout_s=10, what="not ready while the model server is down")
    status, body = http(worker, "/readyz")
    assert status == 503 and "paused: model server unavailable" in body
    assert sample(worker, "esp_paused", cause="model server") == 1
    scorer.down.clear()
    wait_until(worker.ready, timeout_s=10, what="ready again once the model answers")
    stream.publish_comments([("idle-1", "scored after the outage")])
    stream.collect(scores=1)
    assert stream.score_ids() == {"idle-1"}


def test_a_stream_whose_reader_died_fails_instead_of_reading_empty(emulator: PubSubEmulator) -> None:
    # Every assertion above that nothing was dead-lettered trusts this reader to have looked.
    from google.api_core import exceptions as gexc

    from esp.pubsub import subscriber_client

    watched = Stream(unique_settings(emulator))
    admin = subscriber_client(watched.settings)
    try:
        admin.delete_subscription(
            request={"subscription": watched.settings.subscription_path(watched.settings.dead_letter_subscription)}
        )
    finally:
        admin.close()
    t0 = time.monotonic()
    with pytest.raises(gexc.NotFound, match="dead-letter"):
        watched.quiet(30.0)
    assert time.monotonic() - t0 < 15.0, "quiet() stops waiting when a reader dies"
    with pytest.raises(gexc.NotFound):
        assert watched.dead_letters == []
    with pytest.raises(gexc.NotFound):
        watched.collect(scores=1, timeout_s=30.0)
    with pytest.raises(gexc.NotFound):
        watched.close()
