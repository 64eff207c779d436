"""The scoring engine shared by the worker and the HTTP API, with tiny real scorers (no services).

Each test drives `ScoringEngine` the way a host does (submit, outcomes through futures or
on_batch) and checks one promise: batches are shared, every comment gets exactly one outcome,
a model fault is never blamed on comments, a comment's own fault is isolated with its reason,
deadlines are kept during an outage, and a bug in the host fails the engine loudly.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Iterator

import pytest

from esp import outages as causes
from esp.contracts import Comment, ErrorType
from esp.engine import QueueFull, Rejected, Scored, ScoringEngine, Unavailable
from esp.localstack import wait_until
from esp.outages import Outages
from esp.scoring import CANARY_TEXTS, Canary, ModelFault, ModelOutput, ModelUnavailable, score_isolating
from esp.settings import BatchingSettings
from tests.fixtures.worker import BadOutputs, Broken, Crashing, Outage, Rejecting, Slow, SumScorer, sum_probability

FAST = BatchingSettings(max_batch_size=8, max_batch_latency_ms=20.0, retry_initial_backoff_s=0.02, retry_max_backoff_s=0.1)


def comments(n: int, prefix: str = "c", marker: str = "") -> list[Comment]:
    return [Comment(id=f"{prefix}-{i}", text=f"comment number {i} {marker}".strip()) for i in range(n)]


@pytest.fixture
def engines() -> Iterator[list[ScoringEngine]]:
    started: list[ScoringEngine] = []
    try:
        yield started
    finally:
        for engine in started:
            engine.stop(grace_s=1.0)


def start(engines: list[ScoringEngine], scorer, **kwargs) -> ScoringEngine:  # type: ignore[no-untyped-def]
    kwargs.setdefault("settings", FAST)
    engine = ScoringEngine(scorer, **kwargs).start()
    engines.append(engine)
    assert engine.servable.wait(5), engine.not_ready()
    return engine


def outcomes(futures: list[concurrent.futures.Future], timeout_s: float = 10.0) -> list:
    return [f.result(timeout=timeout_s) for f in futures]


# ---------------------------------------------------------------------------------------------
# The pure isolation logic (esp.scoring), used by the engine and the Beam backfill alike


def test_a_clean_batch_costs_one_call_and_no_canary() -> None:
    scorer = SumScorer()
    result = score_isolating(scorer, comments(5), canary=Canary(scorer))
    assert all(isinstance(o, Scored) for o in result)
    assert scorer.calls == 1


def test_a_rejected_comment_is_isolated_and_its_neighbours_scored() -> None:
    scorer = Rejecting(SumScorer())
    batch = comments(8)
    batch[5] = Comment(id="bad", text="<<REJECT>> this one")
    result = score_isolating(scorer, batch, canary=Canary(scorer))
    assert [type(o) for o in result] == [Scored] * 5 + [Rejected] + [Scored] * 2
    assert result[5].error_type == ErrorType.MODEL_REJECTED and "<<REJECT>>" in result[5].reason
    assert result[0].score.probabilities["toxic"] == pytest.approx(sum_probability(batch[0].text, "toxic"))


def test_a_nan_row_is_never_a_score_and_only_its_comment_is_rejected() -> None:
    scorer = BadOutputs(SumScorer())
    batch = comments(6)
    batch[2] = Comment(id="nan", text="<<NAN>> here")
    result = score_isolating(scorer, batch, canary=Canary(scorer))
    assert isinstance(result[2], Rejected) and result[2].error_type == ErrorType.MODEL_OUTPUT_INVALID
    assert "nan" in result[2].reason
    assert all(isinstance(o, Scored) for i, o in enumerate(result) if i != 2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.25, 1.5])
def test_outputs_outside_zero_one_are_refused(value: float) -> None:
    scorer = BadOutputs(SumScorer(), value=value)
    result = score_isolating(scorer, [Comment("x", "<<NAN>>")], canary=Canary(scorer))
    assert isinstance(result[0], Rejected) and result[0].error_type == ErrorType.MODEL_OUTPUT_INVALID


def test_an_unexpected_error_caused_by_one_comment_is_isolated() -> None:
    scorer = Crashing(SumScorer())
    batch = comments(4) + [Comment("boom", "<<CRASH>>")]
    result = score_isolating(scorer, batch, canary=Canary(scorer))
    assert isinstance(result[4], Rejected) and result[4].error_type == ErrorType.MODEL_ERROR
    assert "RuntimeError" in result[4].reason
    assert all(isinstance(o, Scored) for o in result[:4])


def test_a_model_that_refuses_everything_is_a_fault_not_a_batch_of_poison() -> None:
    scorer = Broken(SumScorer())
    scorer.broken.set()
    with pytest.raises(ModelFault, match="canary failed too"):
        score_isolating(scorer, comments(8), canary=Canary(scorer))
    assert scorer.calls == 2, "one batch call and one canary call: no bisection of innocent comments"


def test_a_model_answering_nan_for_everything_is_a_fault() -> None:
    scorer = BadOutputs(SumScorer())
    scorer.everything.set()
    with pytest.raises(ModelFault):
        score_isolating(scorer, comments(8), canary=Canary(scorer))


def test_isolation_costs_at_most_two_calls_per_suspect() -> None:
    scorer = Rejecting(SumScorer())
    batch = comments(32)
    for i in (3, 17, 30):
        batch[i] = Comment(id=f"bad-{i}", text=f"<<REJECT>> {i}")
    result = score_isolating(scorer, batch, canary=Canary(scorer))
    assert sum(isinstance(o, Rejected) for o in result) == 3
    assert scorer.inner.calls <= 2 * 32 + 1


def test_when_most_comments_fail_alone_the_canary_is_asked_again() -> None:
    class BreaksMidway:
        """Answers the first two calls (the batch's rows fail; the canary passes), then breaks."""

        def __init__(self) -> None:
            self.inner = BadOutputs(SumScorer())
            self.calls = 0

        def predict(self, texts):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls > 2:
                self.inner.everything.set()
            return self.inner.predict(texts)

        def close(self) -> None:
            pass

    scorer = BreaksMidway()
    with pytest.raises(ModelFault, match="failed alone"):
        score_isolating(scorer, comments(4, marker="<<NAN>>"), canary=Canary(scorer))


def test_a_model_that_breaks_after_a_canary_pass_is_not_blamed_on_a_lone_comment() -> None:
    scorer = BadOutputs(SumScorer())
    canary = Canary(scorer, pass_ttl_s=60.0)
    (poison,) = score_isolating(scorer, [Comment("p", "<<NAN>> poison")], canary=canary)
    assert isinstance(poison, Rejected), "a real poison comment, while the canary passes (and the pass is remembered)"
    scorer.everything.set()  # a bad version rolls out, well within the remembered pass
    with pytest.raises(ModelFault, match="canary now fails too"):
        score_isolating(scorer, [Comment("g", "thanks for fixing the citation")], canary=canary)


def test_canary_texts_are_the_exports_warmup_texts() -> None:
    # A model server that loaded a version has run its warm-up: the canary asks nothing new of it.
    from training.export import _WARMUP_TEXTS

    assert set(CANARY_TEXTS) <= set(_WARMUP_TEXTS)


# ---------------------------------------------------------------------------------------------
# The engine: threads, batching, outages, deadlines


def test_concurrent_single_comment_callers_share_batches(engines: list[ScoringEngine]) -> None:
    scorer = Slow(SumScorer(), delay_s=0.05)
    engine = start(engines, scorer, settings=BatchingSettings(max_batch_size=16, max_batch_latency_ms=30.0, batches_in_flight=1))
    probe_calls = scorer.inner.calls
    barrier = threading.Barrier(40)

    def one_caller(i: int) -> object:
        barrier.wait()
        return engine.submit(Comment(f"u-{i}", f"single comment {i}")).result(timeout=10)

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one_caller, range(40)))
    assert all(isinstance(r, Scored) for r in results)
    calls = scorer.inner.calls - probe_calls
    assert calls <= 6, f"40 single-comment callers took {calls} Predict calls"
    assert max(scorer.inner.batch_sizes) > 1


def test_every_comment_gets_exactly_one_outcome_through_on_batch_and_its_future(engines: list[ScoringEngine]) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def on_batch(results):  # type: ignore[no-untyped-def]
        with lock:
            seen.extend(job.comment.id for job, _ in results)

    scorer = Rejecting(SumScorer())
    engine = start(engines, scorer, on_batch=on_batch)
    batch = comments(50) + [Comment("bad", "<<REJECT>>")]
    futures = [engine.submit(c) for c in batch]
    results = outcomes(futures)
    assert sorted(seen) == sorted(c.id for c in batch)
    assert isinstance(results[-1], Rejected) and all(isinstance(r, Scored) for r in results[:-1])


def test_an_outage_pauses_and_every_comment_is_scored_after_it(engines: list[ScoringEngine]) -> None:
    scorer = Outage(SumScorer())
    outages = Outages()
    engine = start(engines, scorer, probe=scorer.probe, outages=outages)
    scorer.down.set()
    futures = [engine.submit(c) for c in comments(20)]
    deadline = time.monotonic() + 5
    while not outages.is_open(causes.MODEL):
        assert time.monotonic() < deadline, "the model outage was never opened"
        time.sleep(0.01)
    assert engine.not_ready() is not None and "unavailable" in engine.not_ready()
    assert not any(f.done() for f in futures), "comments without a deadline wait out the outage"
    scorer.down.clear()
    assert all(isinstance(r, Scored) for r in outcomes(futures))
    assert not outages.paused() and engine.not_ready() is None


def test_a_model_fault_pauses_like_an_outage_and_blames_no_comment(engines: list[ScoringEngine]) -> None:
    scorer = Broken(SumScorer())
    engine = start(engines, scorer)
    scorer.broken.set()
    futures = [engine.submit(c) for c in comments(10)]
    deadline = time.monotonic() + 5
    while (engine.registry.get_sample_value("esp_model_faults_total") or 0) < 1:
        assert time.monotonic() < deadline, "the canary never reported a model fault"
        time.sleep(0.01)
    assert not any(f.done() for f in futures)
    assert "paused" in (engine.not_ready() or "")
    scorer.broken.clear()  # the bad version is withdrawn
    assert all(isinstance(r, Scored) for r in outcomes(futures))


def test_a_deadline_is_kept_during_an_outage(engines: list[ScoringEngine]) -> None:
    scorer = Outage(SumScorer())
    engine = start(engines, scorer, probe=scorer.probe)
    scorer.down.set()
    started = time.monotonic()
    futures = [engine.submit(c, deadline=started + 0.3) for c in comments(5)]
    results = outcomes(futures, timeout_s=5)
    assert all(isinstance(r, Unavailable) for r in results)
    assert time.monotonic() - started < 1.5, "answered Unavailable within the deadline, plus little"
    assert "unavailable" in results[0].reason
    # Submitted while the model is known to be down: answered at its deadline, never left hanging.
    late = engine.submit(Comment("late", "after the outage began"), deadline=time.monotonic() + 0.2).result(timeout=5)
    assert isinstance(late, Unavailable)
    scorer.down.clear()
    ok = engine.submit(Comment("back", "the server is back"), deadline=time.monotonic() + 5).result(timeout=6)
    assert isinstance(ok, Scored)


def test_a_full_queue_refuses_at_once(engines: list[ScoringEngine]) -> None:
    scorer = Outage(SumScorer())
    engine = start(engines, scorer, probe=scorer.probe, max_queued=4,
                   settings=BatchingSettings(max_batch_size=2, batches_in_flight=1, retry_initial_backoff_s=0.02, retry_max_backoff_s=0.1))
    scorer.down.set()
    futures = []
    with pytest.raises(QueueFull):
        for c in comments(50):
            futures.append(engine.submit(c))
    assert len(futures) <= 4 + 2, "the queue holds max_queued, plus one batch in flight"
    scorer.down.clear()
    assert all(isinstance(r, Scored) for r in outcomes(futures))


def test_stop_answers_every_waiting_comment(engines: list[ScoringEngine]) -> None:
    scorer = Outage(SumScorer())
    engine = ScoringEngine(scorer, settings=FAST, probe=scorer.probe).start()
    assert engine.servable.wait(5)
    scorer.down.set()
    futures = [engine.submit(c) for c in comments(30)]
    engine.stop(grace_s=0.3)
    results = outcomes(futures, timeout_s=5)
    assert all(isinstance(r, Unavailable) and "shutting down" in r.reason for r in results)
    assert isinstance(engine.submit(Comment("after", "stop")).result(timeout=1), Unavailable)


def test_a_bug_in_the_host_fails_the_engine_loudly_and_answers_the_batch(engines: list[ScoringEngine]) -> None:
    def on_batch(results):  # type: ignore[no-untyped-def]
        raise KeyError("a bug in the host's publishing code")

    engine = start(engines, SumScorer(), on_batch=on_batch)
    results = outcomes([engine.submit(c) for c in comments(3)])
    assert all(isinstance(r, Scored) for r in results)
    deadline = time.monotonic() + 5
    while engine.alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "KeyError" in (engine.fatal or "") and "failed" in (engine.not_ready() or "")


def test_an_idle_engine_probes_and_reports_the_model_gone(engines: list[ScoringEngine]) -> None:
    scorer = Outage(SumScorer())
    engine = start(engines, scorer, probe=scorer.probe,
                   settings=BatchingSettings(idle_probe_interval_s=0.1, retry_initial_backoff_s=0.02, retry_max_backoff_s=0.05))
    scorer.down.set()
    deadline = time.monotonic() + 5
    while engine.not_ready() is None:
        assert time.monotonic() < deadline, "an idle engine never noticed the model server going away"
        time.sleep(0.01)
    scorer.down.clear()
    while engine.not_ready() is not None:
        assert time.monotonic() < deadline + 5
        time.sleep(0.01)


class _DispatcherClock:
    """time.monotonic, counting the calls the engine's dispatcher thread makes: one per turn of its loop."""

    def __init__(self) -> None:
        self.dispatcher_calls = 0

    def __call__(self) -> float:
        if threading.current_thread().name == "esp-dispatch":
            self.dispatcher_calls += 1
        return time.monotonic()


def test_the_dispatcher_sleeps_while_a_batch_waits_out_an_outage(engines: list[ScoringEngine]) -> None:
    scorer = Outage(SumScorer())
    clock = _DispatcherClock()
    engine = start(engines, scorer, probe=scorer.probe, clock=clock,
                   settings=BatchingSettings(retry_initial_backoff_s=0.2, retry_max_backoff_s=0.4))
    scorer.down.set()
    future = engine.submit(Comment("a", "hello"))
    wait_until(engine.is_down, timeout_s=5, what="the outage")
    turns = clock.dispatcher_calls

    def retries() -> float:
        return engine.registry.get_sample_value("esp_batch_retries_total") or 0

    first = retries()
    wait_until(lambda: retries() >= first + 3, timeout_s=10, what="three retries of the batch (about a second)")
    turns = clock.dispatcher_calls - turns
    scorer.down.clear()
    assert isinstance(future.result(timeout=10), Scored)
    assert turns < 50, f"the dispatcher turned {turns} times while one batch waited out three retries"


class _SlowToSeeStop(threading.Event):
    """The engine's stop flag, as read by a submitting thread that is descheduled right after reading
    it: it waits for stop() to finish (at most a second) before going on with what it read."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_returned = threading.Event()

    def is_set(self) -> bool:
        value = super().is_set()
        if threading.current_thread().name == "submitter":
            self.stop_returned.wait(1.0)
        return value


def test_a_comment_submitted_while_stop_runs_gets_an_outcome() -> None:
    engine = ScoringEngine(SumScorer(), settings=BatchingSettings(max_batch_size=8, max_batch_latency_ms=10_000))
    flag = engine._stopping = _SlowToSeeStop()
    engine.start()
    assert engine.servable.wait(5), engine.not_ready()
    submitted: list[concurrent.futures.Future] = []
    submitter = threading.Thread(target=lambda: submitted.append(engine.submit(Comment("a", "b"))), name="submitter")
    submitter.start()
    try:
        engine.stop(grace_s=0.1)
    finally:
        flag.stop_returned.set()
        submitter.join(10)
    assert submitted, "submit neither raised nor returned"
    assert isinstance(submitted[0].result(timeout=5), Unavailable), "a comment submitted while stop() ran never got an outcome"


class _OpensLate(Outages):
    """Outages whose `begin` is reached late: the thread that found the model down is descheduled
    between the engine's state change and its report to esp.outages."""

    def __init__(self) -> None:
        super().__init__()
        self.opening = threading.Event()
        self.go = threading.Event()

    def begin(self, cause: str, reason: str) -> None:
        self.opening.set()
        self.go.wait(10)
        super().begin(cause, reason)


def test_an_answer_overtaking_a_failure_never_leaves_the_outage_open(engines: list[ScoringEngine]) -> None:
    outages = _OpensLate()

    class FailsAOnce(SumScorer):
        """Batches A and B at the model server together: A meets an outage; B answers while A's is being opened."""

        failed = False
        b_in_flight = threading.Event()

        def predict(self, texts):  # type: ignore[no-untyped-def]
            if "A" in texts and not self.failed:
                self.failed = True
                assert self.b_in_flight.wait(10)
                raise ModelUnavailable("model server restarting (UNAVAILABLE)")
            if "B" in texts:
                self.b_in_flight.set()
                assert outages.opening.wait(10)
            return super().predict(texts)

    engine = start(engines, FailsAOnce(), outages=outages,
                   settings=BatchingSettings(max_batch_size=1, max_batch_latency_ms=0, batches_in_flight=2,
                                             retry_initial_backoff_s=0.05, retry_max_backoff_s=0.2))
    try:
        fa, fb = engine.submit(Comment("a", "A")), engine.submit(Comment("b", "B"))
        assert isinstance(fb.result(timeout=5), Scored), "an answer never waits on another thread's outage report"
    finally:
        outages.go.set()
    assert isinstance(fa.result(timeout=10), Scored)
    wait_until(lambda: not outages.paused(), timeout_s=5, what=f"the outage to close: {outages.describe()}")
    assert not engine.is_down() and engine.not_ready() is None


def test_outage_edges_reach_the_callbacks_in_the_order_they_happened() -> None:
    reported: list[bool] = []
    closed = threading.Event()

    def on_change(cause: str, is_open: bool) -> None:
        if is_open:
            closed.wait(1.0)  # the opening thread is descheduled between its state change and its report
        reported.append(is_open)
        if not is_open:
            closed.set()

    outages = Outages(on_change=on_change)
    opener = threading.Thread(target=outages.begin, args=(causes.MODEL, "UNAVAILABLE"))
    opener.start()
    wait_until(lambda: outages.is_open(causes.MODEL), timeout_s=5, what="the outage to open")
    outages.end(causes.MODEL)
    opener.join(10)
    wait_until(lambda: len(reported) == 2, timeout_s=5, what="both edges reported")
    assert reported == [True, False], "the last edge reported must be the last that happened (esp_paused follows it)"
    assert not outages.paused()


def test_model_output_check_covers_rows_labels_and_thresholds() -> None:
    from esp.scoring import output_problems

    good = ModelOutput("m", 1, ("a", "b"), [(0.1, 0.2)], {"a": 0.5, "b": 0.5}, [False])
    assert output_problems(good, 1) == (None, {})
    assert "rows" in (output_problems(good, 2)[0] or "")
    no_threshold = ModelOutput("m", 1, ("a", "b"), [(0.1, 0.2)], {"a": math.nan, "b": 0.5}, [False])
    assert "threshold" in (output_problems(no_threshold, 1)[0] or "")
    short_row = ModelOutput("m", 1, ("a", "b"), [(0.1,)], {"a": 0.5, "b": 0.5}, [False])
    assert "values" in (output_problems(short_row, 1)[0] or "")
