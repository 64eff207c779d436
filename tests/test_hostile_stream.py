"""Hostile inputs and settings against the promise: nothing lost, poison set aside with its reason,
no silent stop; bad arguments or start-up failures are one line and a non-zero exit, never a traceback.

Each test here failed on the code it was written against, for the reason its docstring names.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from esp.errors import ConfigError, EspError
from esp.localstack import PubSubEmulator, wait_until
from esp.publishing import read_rows
from esp.pubsub import publisher_client
from esp.pubsub_admin import init_resources
from esp.settings import PubSubSettings
from tests.fixtures.pubsub import unique_settings
from tests.fixtures.worker import Stream, SumScorer, fast_worker_settings
from worker.service import Worker

INF = float("inf")


def _esp(*args: str, env_extra: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    try:
        return subprocess.run(
            [sys.executable, "-m", "esp.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"esp {' '.join(args)} still running after {timeout_s:g}s; stderr so far:\n{err[-3000:]}")


def _env(settings: PubSubSettings, **extra: str) -> dict[str, str]:
    return {
        "PUBSUB_EMULATOR_HOST": settings.emulator_host or "",
        "ESP_PROJECT": settings.project,
        "ESP_COMMENTS_TOPIC": settings.comments_topic,
        "ESP_SCORES_TOPIC": settings.scores_topic,
        "ESP_SUBSCRIPTION": settings.subscription,
        "ESP_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "ESP_DEAD_LETTER_SUBSCRIPTION": settings.dead_letter_subscription,
        **extra,
    }


def _one_line_or_success(result: subprocess.CompletedProcess, what: str) -> None:
    assert "Traceback" not in result.stderr, f"{what}: traceback instead of one line:\n{result.stderr[-3000:]}"
    assert result.returncode in (0, 2), f"{what}: exit {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.fixture
def ready(emulator: PubSubEmulator) -> PubSubSettings:
    settings = unique_settings(emulator)
    init_resources(settings)
    return settings


# ---------------------------------------------------------------------------------------------
# esp publish: a file row is hostile


def test_a_csv_field_over_the_field_size_limit_does_not_turn_its_remains_into_comments() -> None:
    """A quoted CSV field longer than csv's field size limit (131,072 characters) is rejected as
    `invalid_csv`, but the reader then restarts mid-field: every later line of that one field
    becomes a row of its own, and `esp publish` publishes them as comments with the ids and texts
    the field's author chose. A rejected row must not come back as forged comments."""
    big = "A" * 140_000
    text = f'id,text\nok1,first\nbig,"{big}\nforged-1,you are wonderful\nforged-2,hello"\nok2,second\n'
    rows = list(read_rows(io.StringIO(text, newline=""), "csv", id_column="id", text_column=None, max_body_bytes=65_536))
    published = [r.comment.id for r in rows if r.comment is not None]
    assert not {"forged-1", "forged-2"} & set(published), (
        f"parts of the rejected row at line 3 would be published as comments: {published}; "
        f"rejections: {[(r.line, r.error) for r in rows if r.error]}"
    )


def test_a_csv_field_past_what_the_reader_holds_stops_the_file_with_the_line() -> None:
    """A field too long even to be read whole (over 4x the body limit and csv's own limit) stops
    the file with an error naming its line; nothing after it is read, and no part of it is a row."""
    import csv

    big = "A" * (csv.field_size_limit() + 10)
    text = f'id,text\nok1,first\nbig,"{big}\nforged-1,you are wonderful"\nok2,second\n'
    rows = read_rows(io.StringIO(text, newline=""), "csv", id_column="id", text_column=None, max_body_bytes=1000)
    assert next(rows).comment.id == "ok1"
    with pytest.raises(EspError, match="reading stopped at line 3: field larger than field limit"):
        next(rows)


@pytest.mark.parametrize("attribute", ["topic=x", "data=x", "self=x", "ordering_key=k", "timeout=5", "retry=x"])
def test_publish_attribute_named_like_a_client_keyword_is_one_line_or_published(
    ready: PubSubSettings, tmp_path: Path, attribute: str
) -> None:
    """`esp publish --attribute KEY=VALUE` passes the pair to the client's publish() as a keyword
    argument, so KEY `topic`, `data`, `self` (TypeError), `ordering_key` (ValueError) end in a
    traceback, and `timeout` or `retry` kill the client's commit thread: the command then waits
    `--pubsub-timeout-s` + 60 s and blames Pub/Sub ('no answer ... within 65s'). Pub/Sub takes
    these names as attributes (ESP's own dead letters carry them, see contracts.CLIENT_KEYWORDS):
    either publish them or refuse them in one line, exit 2."""
    path = tmp_path / "two.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n{"id": "b", "text": "world"}\n', encoding="utf-8")
    result = _esp(
        "publish", str(path), "--no-progress", "--attribute", attribute,
        env_extra=_env(ready, ESP_PUBSUB_TIMEOUT_S="5"), timeout_s=40,
    )  # fmt: skip
    _one_line_or_success(result, f"--attribute {attribute}")


def test_publish_with_an_infinite_pubsub_timeout_is_one_line_or_works(ready: PubSubSettings, tmp_path: Path) -> None:
    """ESP_PUBSUB_TIMEOUT_S=inf passes validation (`> 0`); `esp publish` then sends the rows and
    crashes while waiting for the answers (OverflowError from a lock's timeout), so the summary of
    what was published is lost behind a traceback."""
    path = tmp_path / "two.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n{"id": "b", "text": "world"}\n', encoding="utf-8")
    result = _esp("publish", str(path), "--no-progress", env_extra=_env(ready, ESP_PUBSUB_TIMEOUT_S="inf"))
    _one_line_or_success(result, "ESP_PUBSUB_TIMEOUT_S=inf")


# ---------------------------------------------------------------------------------------------
# esp dead-letters replay: numeric options


@pytest.mark.parametrize("rate", ["nan", "inf", "1e-300"])
def test_replay_rate_out_of_range_is_one_line(ready: PubSubSettings, rate: str) -> None:
    """`--rate` is a FloatRange(min=0, min_open=True): it lets `nan` and `inf` through
    (math.ceil(nan) -> ValueError, math.ceil(inf) -> OverflowError, both tracebacks), and a tiny
    positive rate crashes after the first republish (time.sleep(1e300): OverflowError)."""
    client = publisher_client(ready)
    topic = ready.topic_path(ready.dead_letter_topic)
    try:
        for i in range(2):
            client.publish(topic, json.dumps({"id": f"d{i}", "text": "hi"}).encode(), esp_error_type="invalid_json",
                           esp_stage="validate", esp_reason="x").result(timeout=30)  # fmt: skip
    finally:
        client.stop()
    result = _esp("dead-letters", "replay", "--rate", rate, "--pull-idle-s", "1", env_extra=_env(ready))
    _one_line_or_success(result, f"replay --rate {rate}")


# ---------------------------------------------------------------------------------------------
# esp worker run: settings that validation accepts


def _worker_with(emulator: PubSubEmulator, **overrides: object) -> tuple[Stream, Worker] | None:
    try:
        settings, batching = fast_worker_settings(**overrides)
    except ConfigError as exc:
        # Refused up front, in one line, for the value itself: what the promise asks.
        assert any(word in str(exc) for word in ("finite", "at most", "between")), str(exc)
        return None
    stream = Stream(unique_settings(emulator))
    worker = Worker(SumScorer(), pubsub=stream.settings, settings=settings, batching=batching)
    worker.start()
    wait_until(worker.ready, timeout_s=15, what="the worker to become ready")
    return stream, worker


def test_an_infinite_shutdown_grace_is_refused_or_the_worker_still_stops(emulator: PubSubEmulator) -> None:
    """`--shutdown-grace-s inf` (ESP_SHUTDOWN_GRACE_S=inf) passes `>= 0`; the worker runs and
    scores, but on SIGTERM `stop()` raises OverflowError from `thread.join(timeout=inf)`: no drain,
    no nacks, no flush, a traceback from `esp worker run`."""
    started = _worker_with(emulator, shutdown_grace_s=INF)
    if started is None:
        return
    stream, worker = started
    try:
        stream.publish_comments([(f"c{i}", f"text {i}") for i in range(3)])
        stream.collect(scores=3, timeout_s=20)
        worker.stop()  # must drain and return, as with any other grace
    finally:
        stream.close()


def test_an_unbounded_batch_latency_is_refused_or_comments_still_get_scored(emulator: PubSubEmulator) -> None:
    """`--max-batch-latency-ms inf` passes `>= 0`; a batch that does not fill is then never sent:
    the worker is ready and healthy, holds the comments and extends their leases, and scores none
    of them (a silent stop until --max-lease-duration-s, then the same again on redelivery)."""
    started = _worker_with(emulator, max_batch_latency_ms=INF)
    if started is None:
        return
    stream, worker = started
    try:
        stream.publish_comments([(f"c{i}", f"text {i}") for i in range(3)])  # fewer than max_batch_size (8)
        stream.collect(scores=3, timeout_s=15)
    finally:
        worker.stop()
        stream.close()


# ---------------------------------------------------------------------------------------------
# esp backfill: a truncated gzip


def test_a_gzip_cut_short_fails_the_backfill_instead_of_finishing_as_success(tmp_path: Path, test_model_base: Path) -> None:
    """A .jsonl.gz whose compressed stream ends early (an interrupted upload or copy) is read by
    Beam up to the cut and the rest is silently dropped: the run ends with every line it saw scored,
    no dead letter and no error, so `esp backfill` exits 0 having scored 100 of 200 comments.
    `esp publish` refuses the same file ('reading stopped after line N'); the backfill must not
    report success either."""
    from beam_jobs.backfill import BackfillConfig, run

    lines = [json.dumps({"id": f"c{i:03d}", "text": f"comment number {i}"}) + "\n" for i in range(200)]
    gz = zlib.compressobj(wbits=31)  # gzip framing
    head = gz.compress("".join(lines[:100]).encode()) + gz.flush(zlib.Z_FULL_FLUSH)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(head)  # cut at a flush point after line 100: no end-of-stream marker, no trailer
    try:
        summary = run(BackfillConfig(input=str(path), output=str(tmp_path / "out"), backend="saved_model",
                                     saved_model_dir=str(test_model_base)))  # fmt: skip
    except EspError:
        return
    pytest.fail(f"a gzip cut after line 100 of 200 finished as a success: {summary.line()}")


# ---------------------------------------------------------------------------------------------
# The model client: a comment too large for the channel


def test_a_predict_too_large_for_the_channel_is_not_a_model_outage() -> None:
    """With ESP_MAX_BODY_BYTES raised (allowed up to 10,000,000) above ESP_MODEL_MAX_MESSAGE_BYTES
    (allowed down to 4 MiB), or 27+ near-10 MB comments in one batch of 32 at the default 256 MiB,
    the Predict request is refused by gRPC on this side ('CLIENT: Sent message larger than max',
    RESOURCE_EXHAUSTED). The client retries it and raises ModelUnavailable, so the engine opens a
    'model server' outage and retries the same batch for as long as it holds the lease: one comment
    pauses every worker that pulls it, and it is never dead-lettered with a reason. The request's
    size is the input's fault (worker/publisher.py already treats Pub/Sub's 'larger than max' as a
    content fault); it must not read as an outage, so the canary can isolate the comment."""
    import concurrent.futures

    import grpc

    from esp.scoring import OUTAGE_ERRORS
    from serving.client import TFServingScorer

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    scorer = TFServingScorer(f"127.0.0.1:{port}", max_message_bytes=4 * 1024 * 1024, retry_budget_s=1.0, timeout_s=2.0)
    try:
        with pytest.raises(Exception) as caught:
            scorer.predict(["x" * 5_000_000])
        assert "larger than max" in str(caught.value)
        assert not isinstance(caught.value, OUTAGE_ERRORS), f"read as an outage: {caught.value!r}"
    finally:
        scorer.close()
        server.stop(0)


def test_a_bzip2_cut_short_fails_too_and_a_whole_one_is_scored(tmp_path: Path, test_model_base: Path) -> None:
    import bz2

    from beam_jobs.backfill import BackfillConfig, run

    body = "".join(json.dumps({"id": f"c{i:03d}", "text": f"comment number {i}"}) + "\n" for i in range(50)).encode()
    whole, cut = tmp_path / "whole.jsonl.bz2", tmp_path / "cut.jsonl.bz2"
    whole.write_bytes(bz2.compress(body))
    cut.write_bytes(bz2.compress(body)[:-20])
    model = str(test_model_base)
    summary = run(BackfillConfig(input=str(whole), output=str(tmp_path / "w"), backend="saved_model", saved_model_dir=model))
    assert (summary.read, summary.scored) == (50, 50)
    with pytest.raises(EspError, match=r"cut short or corrupt: .*cut\.jsonl\.bz2"):
        run(BackfillConfig(input=str(cut), output=str(tmp_path / "c"), backend="saved_model", saved_model_dir=model))


@pytest.mark.parametrize("suffix", [".deflate", ".zst"])
def test_a_deflate_or_zstd_input_cut_short_fails_too(tmp_path: Path, test_model_base: Path, suffix: str) -> None:
    """Beam reads .deflate and .zst inputs too, and stops at a cut as silently as in a gzip: a zstd
    frame cut short yields no line at all, so the run 'succeeds' with nothing scored."""
    import zstandard

    from beam_jobs.backfill import BackfillConfig, run

    body = "".join(json.dumps({"id": f"c{i:03d}", "text": f"comment number {i}"}) + "\n" for i in range(50)).encode()
    compressed = zlib.compress(body) if suffix == ".deflate" else zstandard.ZstdCompressor().compress(body)
    whole, cut = tmp_path / f"whole.jsonl{suffix}", tmp_path / f"cut.jsonl{suffix}"
    whole.write_bytes(compressed + compressed)  # two streams, one after the other: Beam reads both
    cut.write_bytes(compressed[:-8])
    model = str(test_model_base)
    summary = run(BackfillConfig(input=str(whole), output=str(tmp_path / "w"), backend="saved_model", saved_model_dir=model))
    assert (summary.read, summary.scored) == (100, 100)
    with pytest.raises(EspError, match=rf"cut short or corrupt: .*cut\.jsonl\{suffix}"):
        run(BackfillConfig(input=str(cut), output=str(tmp_path / "c"), backend="saved_model", saved_model_dir=model))



def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_backfill_whose_model_server_is_down_says_so_in_one_line_before_it_starts(tmp_path: Path) -> None:
    """With no model server at --model-server, `esp backfill` ran the job, retried every batch for
    the client's whole budget (30 s by default) and ended in Beam's traceback, 166 lines of it: a
    start-up failure, to be said in one line before the job starts."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "backfill", "--input", str(path), "--output", str(tmp_path / "out"),
         "--backend", "tfserving", "--model-server", f"127.0.0.1:{_closed_port()}", "--model-retry-budget-s", "2",
         "--runner=DirectRunner"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "model server cannot score this backfill" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists(), "refused before the job wrote anything"


def test_a_model_server_lost_during_the_backfill_ends_it_in_one_line(tmp_path: Path) -> None:
    """The same outage met by the job itself (the server went away after the pre-flight) ends the
    run with ESP's one line, not the runner's re-raised exception."""
    from beam_jobs.backfill import BackfillConfig, run
    from esp.settings import ModelClientSettings

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n', encoding="utf-8")
    client = ModelClientSettings(model_server=f"127.0.0.1:{_closed_port()}", model_retry_budget_s=1.0)
    with pytest.raises(EspError, match=r"^the backfill stopped, the model server failed it: Predict .* UNAVAILABLE") as caught:
        run(BackfillConfig(input=str(path), output=str(tmp_path / "out"), backend="tfserving", client=client))
    assert "\n" not in str(caught.value)


def test_the_direct_runner_never_tries_the_prism_runner(tmp_path: Path, test_model_base: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Beam 2.77's DirectRunner first tries Prism, downloading it from GitHub (a network call on
    every local run; online, a runner ESP is not tested on); ESP's pipelines stay off it."""
    import logging

    from beam_jobs.backfill import BackfillConfig, run

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n', encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="apache_beam"):
        summary = run(BackfillConfig(input=str(path), output=str(tmp_path / "out"), backend="saved_model",
                                     saved_model_dir=str(test_model_base)), ["--runner=DirectRunner"])  # fmt: skip
    assert summary.scored == 1
    prism = [r.getMessage() for r in caplog.records if "prism" in r.getMessage().lower()]
    assert prism == []
