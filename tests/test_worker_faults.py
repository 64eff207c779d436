"""The worker against faults nobody named (issue 9): hostile bodies, broken models, topics that fail,
lease extensions that fail, and a thread that dies. Real emulator; faults on the wire come from
esp.fault_proxy, a gRPC proxy in front of it; model faults from tiny real scorers.

The promise checked each time: nothing lost, poison set aside with its reason, no silent stop.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from esp.contracts import DeadLetter, ErrorType, Stage
from esp.fault_proxy import MODIFY_ACK_DEADLINE, PUBLISH, PULL, FaultProxy, Rule, publish_containing, publish_to
from esp.localstack import PubSubEmulator, wait_until
from serving.client import PREDICT_METHOD, TFServingScorer
from serving.local import ModelServerProcess
from tests.fixtures.model_server import model_client_settings
from tests.fixtures.worker import BadOutputs, Broken, Crashing, Stream, SumScorer, fast_worker_settings
from worker.service import Worker


def sample(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def proxy(emulator: PubSubEmulator) -> Iterator[FaultProxy]:
    p = FaultProxy(emulator.host).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def start(in_process: Callable[..., Worker], stream: Stream) -> Callable[..., Worker]:
    """start(scorer, proxy=None, **overrides): a worker in this process, through the fault proxy if given."""

    def start(scorer: Any, proxy: FaultProxy | None = None, **overrides: object) -> Worker:
        pubsub = stream.settings if proxy is None else dataclasses.replace(stream.settings, emulator_host=proxy.host)
        return in_process(scorer, pubsub, **overrides)

    return start


def letters(stream: Stream) -> list[DeadLetter]:
    return [DeadLetter.from_pubsub(r.message.data, dict(r.message.attributes)) for r in stream.dead_letters]


def drained(worker: Worker) -> None:
    wait_until(lambda: worker._ledger.count == 0, timeout_s=10, what="the flow-control ledger to end at zero")
    assert worker._ledger.bytes == 0


# ---------------------------------------------------------------------------------------------
# Hostile bodies: each is set aside alone, with its reason; the worker goes on


HOSTILE = [
    # Valid JSON that made the parser raise something other than a decode error, killing the thread.
    (b'{"id": "h1", "text": "hello", "n": ' + b"9" * 5000 + b"}", ErrorType.INVALID_JSON),
    (b"[" * 50_000 + b"]" * 50_000, ErrorType.BODY_TOO_LARGE),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, ErrorType.INVALID_JSON),
    # Text and ids UTF-8 cannot carry: they used to reach the model client and look like an outage.
    (b'{"id": "h4", "text": "bad \\ud800 surrogate"}', ErrorType.UNENCODABLE_TEXT),
    (b'{"id": "h5\\udfff", "text": "bad id"}', ErrorType.UNENCODABLE_TEXT),
    (b'{"id": "h6\\nforged log line", "text": "newline in id"}', ErrorType.INVALID_ID),
    (b'{"id": "h7", "text": NaN}', ErrorType.INVALID_JSON),  # NaN is not JSON (esp.contracts.loads_json)
    (b"\x00\x01\x02\xff", ErrorType.INVALID_UTF8),
    (b"", ErrorType.INVALID_JSON),
]


def test_hostile_bodies_never_stop_the_worker_and_everything_after_them_is_scored(stream: Stream, start: Callable[..., Worker]) -> None:
    worker = start(SumScorer())
    stream.publish([body for body, _ in HOSTILE], esp_reason="forged by a producer", origin="fuzz")
    stream.publish_comments([(f"after-{i}", f"ordinary comment {i}") for i in range(300)])
    stream.collect(scores=300, dead_letters=len(HOSTILE), timeout_s=60)
    stream.quiet(0.5)

    assert stream.score_ids() == {f"after-{i}" for i in range(300)}
    got = sorted((letter.data, letter.error_type) for letter in letters(stream))
    assert got == sorted(HOSTILE)
    for letter in letters(stream):
        assert letter.stage == Stage.VALIDATE and letter.reason and letter.reason != "forged by a producer"
    assert worker.alive() and worker.ready()
    drained(worker)


def test_comments_the_model_cannot_score_alone_are_isolated_then_dead_lettered_on_their_last_attempt(
    stream: Stream, start: Callable[..., Worker]
) -> None:
    scorer = Crashing(BadOutputs(SumScorer()))
    start(scorer, max_batch_latency_ms=50.0)
    good = [(f"g-{i}", f"good comment {i}") for i in range(30)]
    stream.publish_comments(good[:15] + [("nan-1", "<<NAN>> gives NaN"), ("crash-1", "<<CRASH>> raises")] + good[15:])
    # Nacked on each attempt before the last (5, the subscription's policy), then dead-lettered by ESP.
    stream.collect(scores=30, dead_letters=2, timeout_s=60)
    by_id = {json.loads(letter.data)["id"]: letter for letter in letters(stream)}
    assert by_id["nan-1"].error_type == ErrorType.MODEL_OUTPUT_INVALID and "nan" in by_id["nan-1"].reason
    assert by_id["crash-1"].error_type == ErrorType.MODEL_ERROR and "RuntimeError" in by_id["crash-1"].reason
    assert all(letter.stage == Stage.SCORE and letter.delivery_attempt == 5 for letter in by_id.values())
    scored = [json.loads(r.message.data) for r in stream.scores]
    assert all(v == v and 0 <= v <= 1 for rec in scored for v in rec["scores"].values()), "no NaN is ever published"


def test_a_comment_the_model_server_fails_on_is_dead_lettered_and_pauses_nothing(
    stream: Stream, start: Callable[..., Worker], model_server: ModelServerProcess
) -> None:
    # TF Serving answers INTERNAL when one input trips a failing op (a query of death). Here the real
    # `esp serve` sits behind esp.fault_proxy, which fails Predict with INTERNAL on the marker only:
    # the server answers everything else, the canary included. It once looked like an outage: the
    # worker paused and retried that batch forever, and no neighbour was ever scored.
    proxy = FaultProxy(model_server.target).start()
    proxy.add(Rule(PREDICT_METHOD, grpc.StatusCode.INTERNAL, "injected: op failed", matches=lambda r: b"<<op-fails>>" in r))
    scorer = TFServingScorer.from_settings(model_client_settings(model_server, model_server=proxy.host))
    try:
        worker = start(scorer)
        good = [(f"g-{i}", f"good comment {i}") for i in range(20)]
        stream.publish_comments(good[:10] + [("qod", "this one <<op-fails>>")] + good[10:])
        stream.collect(scores=20, dead_letters=1, timeout_s=60)
        (letter,) = letters(stream)
        assert json.loads(letter.data)["id"] == "qod"
        assert letter.stage == Stage.SCORE and letter.error_type == ErrorType.MODEL_SERVER_ERROR
        assert "INTERNAL" in letter.reason and letter.delivery_attempt == 5
        assert sample(worker, "esp_batch_retries_total") == 0, "never taken for a model outage"
        assert sample(worker, "esp_model_faults_total") == 0
        drained(worker)
    finally:
        proxy.stop()
        scorer.close()


def test_a_model_that_rejects_everything_pauses_the_worker_instead_of_dead_lettering_the_stream(
    stream: Stream, start: Callable[..., Worker]
) -> None:
    scorer = Broken(SumScorer())
    worker = start(scorer)
    scorer.broken.set()  # a pushed version that wants another input dtype
    stream.publish_comments([(f"m-{i}", f"comment {i}") for i in range(60)])
    wait_until(lambda: sample(worker, "esp_model_faults_total") >= 1, timeout_s=15, what="the canary to report a model fault")
    wait_until(lambda: not worker.ready(), timeout_s=10, what="not ready during the model fault")
    assert "paused" in (worker.not_ready() or "")
    time.sleep(1.0)  # a window in which a blamed stream would show up as dead letters or nacks
    assert stream.dead_letters == []
    assert sample(worker, "esp_messages_total", outcome="nacked_rejected") == 0
    scorer.broken.clear()  # the bad version is withdrawn
    stream.collect(scores=60, timeout_s=30)
    assert stream.dead_letters == []
    drained(worker)


# ---------------------------------------------------------------------------------------------
# Infrastructure faults pause; they do not nack


@pytest.mark.parametrize("topic", ["scores", "dead_letter"])
def test_a_topic_outage_pauses_holds_leases_and_loses_nothing(
    stream: Stream, start: Callable[..., Worker], proxy: FaultProxy, topic: str
) -> None:
    s = stream.settings
    topic_path = s.topic_path(s.scores_topic if topic == "scores" else s.dead_letter_topic)
    worker = start(SumScorer(), proxy)
    rule = proxy.add(Rule(PUBLISH, grpc.StatusCode.UNAVAILABLE, "topic unavailable (injected)", publish_to(topic_path)))
    stream.publish_comments([(f"t-{i}", f"comment during the outage {i}") for i in range(40)])
    stream.publish([b"not json at all"] * 3)
    wait_until(lambda: rule.hits >= 3, timeout_s=15, what="publishes to meet the outage")
    wait_until(lambda: not worker.ready(), timeout_s=5, what="not ready while a topic is down")
    assert "unavailable" in (worker.not_ready() or "")
    pulls_before = proxy.count("/google.pubsub.v1.Subscriber/Pull")
    time.sleep(1.0)
    assert proxy.count("/google.pubsub.v1.Subscriber/Pull") <= pulls_before + 1, "no pulling while paused"
    assert sum(sample(worker, "esp_messages_total", outcome=o) for o in ("nacked_publish_failed", "nacked_rejected", "nacked_shutdown")) == 0
    proxy.remove(rule)
    stream.collect(scores=40, dead_letters=3, timeout_s=30)
    assert sample(worker, "esp_publish_retries_total", topic=s.scores_topic if topic == "scores" else s.dead_letter_topic) >= 1
    assert sample(worker, "esp_paused_seconds_total", cause="scores topic" if topic == "scores" else "dead-letter topic") > 0
    wait_until(worker.ready, timeout_s=5, what="ready again")
    drained(worker)


def test_a_failing_pull_shows_as_a_pubsub_pause_and_the_worker_resumes(
    stream: Stream, start: Callable[..., Worker], proxy: FaultProxy
) -> None:
    worker = start(SumScorer(), proxy)
    wait_until(worker.ready, timeout_s=15, what="ready")
    rule = proxy.add(Rule(PULL, grpc.StatusCode.UNAVAILABLE, "subscription unavailable (injected)"))
    wait_until(lambda: not worker.ready(), timeout_s=15, what="not ready while pulls fail")
    assert "cannot pull" in (worker.not_ready() or "") and "injected" in (worker.not_ready() or "")
    assert sample(worker, "esp_paused", cause="Pub/Sub") == 1
    stream.publish_comments([(f"p-{i}", f"published while pulls fail {i}") for i in range(10)])
    proxy.remove(rule)
    stream.collect(scores=10, timeout_s=30)
    wait_until(worker.ready, timeout_s=10, what="ready again")
    assert sample(worker, "esp_paused", cause="Pub/Sub") == 0
    assert sample(worker, "esp_paused_seconds_total", cause="Pub/Sub") > 0
    drained(worker)


def test_a_score_pubsub_refuses_is_bisected_out_and_dead_lettered_with_the_reason(
    stream: Stream, start: Callable[..., Worker], proxy: FaultProxy
) -> None:
    s = stream.settings
    worker = start(SumScorer(), proxy, max_batch_latency_ms=100.0)
    proxy.add(Rule(PUBLISH, grpc.StatusCode.INVALID_ARGUMENT, "message refused (injected)",
                   publish_containing(s.topic_path(s.scores_topic), b'"id":"refused-1"')))
    stream.publish_comments([(f"n-{i}", f"neighbour {i}") for i in range(10)] + [("refused-1", "its score is refused")])
    stream.collect(scores=10, dead_letters=1, timeout_s=30)
    (letter,) = letters(stream)
    assert json.loads(letter.data)["id"] == "refused-1"
    assert letter.stage == Stage.PUBLISH and letter.error_type == ErrorType.SCORE_PUBLISH_REFUSED
    assert "refused (injected)" in letter.reason
    drained(worker)


def test_failed_lease_extensions_are_retried_before_the_lease_runs_out(
    stream: Stream, start: Callable[..., Worker], proxy: FaultProxy
) -> None:
    # The subscription's ack deadline is 10 s: leases are extended half-way, at 5 s. Extensions fail
    # for 2 s; the worker must keep retrying (every second) and win before 10 s, so nothing is redelivered.
    gate = threading.Event()
    worker = start(BlockingScorer(gate), proxy, lease_extension_s=10, lease_margin_s=5.0)
    stream.publish_comments([(f"l-{i}", f"held comment {i}") for i in range(5)])
    wait_until(lambda: worker._ledger.count == 5, timeout_s=10, what="five comments held")
    rule = proxy.add(Rule(MODIFY_ACK_DEADLINE, grpc.StatusCode.UNAVAILABLE, "lease extension unavailable (injected)"))
    wait_until(lambda: rule.hits >= 1, timeout_s=10, what="an extension to fail")
    time.sleep(2.0)
    proxy.remove(rule)
    wait_until(lambda: sample(worker, "esp_lease_extensions_total") >= 5, timeout_s=10, what="the retried extensions")
    time.sleep(7.0)  # past the original 10 s deadline of the first lease
    gate.set()
    stream.collect(scores=5, timeout_s=30)
    stream.quiet(1.0)
    assert len(stream.scores) == 5, "no lease ran out, so no comment was redelivered and scored twice"
    assert sample(worker, "esp_lease_extension_errors_total") >= 1
    drained(worker)


class BlockingScorer(SumScorer):
    """Answers the canary and probes at once, but holds real comments until `gate` is set."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def predict(self, texts):  # type: ignore[no-untyped-def]
        if any(t.startswith("held comment") for t in texts):
            self.gate.wait(60)
        return super().predict(texts)


# ---------------------------------------------------------------------------------------------
# No zombies


def test_a_worker_thread_that_dies_fails_health_and_run_exits_non_zero(stream: Stream) -> None:
    settings, batching = fast_worker_settings()
    worker = Worker(SumScorer(), pubsub=stream.settings, settings=settings, batching=batching)

    def broken_lease_loop() -> None:
        raise RuntimeError("a bug in the lease keeper")

    worker._lease_loop = broken_lease_loop  # type: ignore[method-assign]  # simulates a bug: nothing else can
    exit_code: list[int] = []
    runner = threading.Thread(target=lambda: exit_code.append(worker.run()), daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert exit_code == [1], "a worker that cannot do its job exits non-zero"
    assert "esp-lease died" in (worker.not_alive() or "") and "RuntimeError" in (worker.not_alive() or "")
    assert sample(worker, "esp_alive") == 0
