"""`esp serve` under hostile inputs and hostile model directories: every finding here is a bug.

Each test states what TF Serving does (tensorflow/serving: file_system_storage_path_source.cc
parses version directories with safe_strto64 and skips what does not parse; grpc_status_util.cc
truncates status messages to 1024 characters; http_rest_api_handler refuses a version that does
not convert) or what docs/serving.md promises, and fails on the code as it was found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from esp.localstack import free_port
from serving.local import ModelServerProcess
from tests.fixtures.model_server import rest_get
from tests.fixtures.models import export_test_model

# ---------------------------------------------------------------------------------------------
# helpers


def _predict_request(*, name: str = "bert", label: str | None = None, signature: str | None = None,
                     key: str = "text", output_filter: tuple[str, ...] = ()) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if label is not None:
        request.model_spec.version_label = label
    if signature is not None:
        request.model_spec.signature_name = signature
    tensor = request.inputs[key]
    tensor.dtype = types_pb2.DT_STRING
    tensor.tensor_shape.dim.add(size=1)
    tensor.string_val.append(b"have a nice day")
    request.output_filter.extend(output_filter)
    return request


class Stubs:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def version(self) -> int:
        return self.predict.Predict(_predict_request(), timeout=10).model_spec.version.value

    def status(self, version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "bert"
        if version is not None:
            request.model_spec.version.value = version
        return self.models.GetModelStatus(request, timeout=10)


@pytest.fixture
def stubs_for() -> Iterator[Callable[[ModelServerProcess], Stubs]]:
    made: list[Stubs] = []

    def make(server: ModelServerProcess) -> Stubs:
        made.append(Stubs(server.target))
        return made[-1]

    yield make
    for stubs in made:
        stubs.channel.close()


def _drop_in_version(base: Path, name: str, *, only_saved_model_pb: bool = False) -> Path:
    """Copies version 1 under a new directory name, atomically (staged, then renamed into place)."""
    staging = base / f".staging-{name}"
    if only_saved_model_pb:  # a copy that has written saved_model.pb and nothing else yet
        staging.mkdir()
        shutil.copy(base / "1" / "saved_model.pb", staging / "saved_model.pb")
    else:
        shutil.copytree(base / "1", staging)
    final = base / name
    os.rename(staging, final)
    return final


def _eventually(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


# ---------------------------------------------------------------------------------------------
# Version directories


def test_a_version_directory_beyond_int64_is_skipped_not_served(tmp_path, start_model_server, stubs_for):
    """Found: a directory named 99999999999999999999 (20 digits, e.g. a timestamp with microseconds)
    is loaded as the latest version, version 1 is unloaded, and from then on every Predict,
    GetModelMetadata and GetModelStatus answers INTERNAL "Value out of range" while the gRPC health
    check says SERVING. GetModelStatus (and the REST status the Kubernetes probe reads, 500) stays
    broken even after the directory is deleted, because the failed version's state is kept forever.
    TF Serving skips a child whose name does not parse as an int64 and keeps serving version 1."""
    base = tmp_path / "bert"
    export_test_model(base, 1)
    server = start_model_server(base)
    stubs = stubs_for(server)
    assert stubs.version() == 1
    _drop_in_version(base, "99999999999999999999")
    _drop_in_version(base, "2")  # once 2 is served, the server has polled with both directories there
    assert _eventually(lambda: stubs.version() == 2, 20), f"version 2 never served: {stubs.status().model_version_status}"
    failures = []
    for _ in range(5):
        try:
            assert stubs.version() == 2
            stubs.status()
        except grpc.RpcError as exc:
            failures.append((exc.code(), exc.details()))
    assert failures == [], f"a 20-digit version directory broke every request: {failures[:2]}"
    assert {s.version for s in stubs.status().model_version_status} <= {1, 2}


def test_a_half_written_version_is_loaded_once_it_is_complete(tmp_path, start_model_server, stubs_for):
    """Found: a version directory seen while it holds only saved_model.pb (a non-atomic upload:
    `gsutil cp -r`, `cp -r`) fails to load on MAX_LOAD_ATTEMPTS (5) consecutive polls (five
    seconds at the default 1 s poll interval), and then is never tried again, even after the directory is deleted
    and the version uploaded again, complete. The rollout silently does not happen; only a restart
    helps. TF Serving un-aspires a version whose directory disappears and loads it afresh when it
    comes back."""
    base = tmp_path / "bert"
    export_test_model(base, 1)
    server = start_model_server(base)
    stubs = stubs_for(server)
    half = _drop_in_version(base, "2", only_saved_model_pb=True)

    def failed() -> bool:
        states = {s.version: s for s in stubs.status().model_version_status}
        return 2 in states and states[2].state == get_model_status_pb2.ModelVersionStatus.END

    assert _eventually(failed, 15), "the half-written version was never tried"
    shutil.rmtree(half)  # replaced between two polls: the server need not see it gone
    export_test_model(base, 2, bias=1.5)  # complete, renamed into place atomically
    assert _eventually(lambda: stubs.version() == 2, 20), (
        f"version 2, now complete, is never loaded: {stubs.status().model_version_status}"
    )


def test_a_stray_directory_with_a_non_ascii_digit_name_does_not_stop_new_versions(tmp_path, start_model_server, stubs_for):
    """Found: list_versions takes any name for which str.isdigit() is true, then int() raises on
    "²" (a superscript two is a digit to Python but not a decimal): every poll ends in a logged
    traceback, and while that directory exists no new version is ever loaded. TF Serving skips
    the name."""
    base = tmp_path / "bert"
    export_test_model(base, 1)
    server = start_model_server(base)
    stubs = stubs_for(server)
    _drop_in_version(base, "²", only_saved_model_pb=True)
    export_test_model(base, 2, bias=1.5)
    assert _eventually(lambda: stubs.version() == 2, 20), "version 2 was never loaded"


def test_a_zero_padded_version_directory_is_served(tmp_path, start_model_server, stubs_for):
    """Found: a version directory named 002 is listed as version 2, then loaded from <base>/2,
    which does not exist: five failed loads and version 2 is never served. TF Serving parses "002"
    as version 2 and loads it from the directory as named."""
    base = tmp_path / "bert"
    export_test_model(base, 1)
    server = start_model_server(base)
    stubs = stubs_for(server)
    _drop_in_version(base, "002")
    assert _eventually(lambda: stubs.version() == 2, 20), (
        f"version 002 never served: {stubs.status().model_version_status}"
    )


# ---------------------------------------------------------------------------------------------
# Requests


@pytest.fixture(scope="module")
def rest_server(test_model_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    server = ModelServerProcess(
        test_model_base, rest_api_port=free_port(), log_path=tmp_path_factory.mktemp("hostile") / "esp-serve.log"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


LONG = "x" * 20_000


@pytest.mark.parametrize(
    "request_kwargs, code",
    [
        ({"name": LONG}, grpc.StatusCode.NOT_FOUND),
        ({"label": LONG}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"signature": LONG}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"key": LONG}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"output_filter": (LONG,)}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["model-name", "version-label", "signature", "input-key", "output-filter"],
)
def test_a_long_name_in_a_bad_request_gets_its_own_status(rest_server, request_kwargs, code):
    """Found: the status message echoes the client's string whole; over gRPC's 16 KiB limit on a
    received header the client gets RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"
    instead of NOT_FOUND / INVALID_ARGUMENT, a code ESP's client retries and then reports as an
    outage (ModelUnavailable), not as ModelNotFound/ModelRejected. TF Serving truncates every
    status message to 1024 characters ("...TRUNCATED")."""
    with grpc.insecure_channel(rest_server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(_predict_request(**request_kwargs), timeout=10)
    assert info.value.code() == code, info.value.details()[:200]


@pytest.mark.parametrize("path", ["/v1/models/bert/versions/99999999999999999999",
                                  "/v1/models/bert/versions/99999999999999999999/metadata"])
def test_rest_version_beyond_int64_is_a_client_error(rest_server, path):
    """Found: 500 {"error": "internal error (see the log)"} and a traceback in the log
    (ValueError: Value out of range). TF Serving answers 400 "Failed to convert version"."""
    code, body = rest_get(rest_server, path)
    assert code in (400, 404), (code, body)


# ---------------------------------------------------------------------------------------------
# Config reloads


def test_health_survives_a_config_reload_that_adds_and_removes_models(tmp_path):
    """Found: ModelManager.all_available (the gRPC health check, serve_forever's start-up wait)
    iterates the models dict while the poller's config reload inserts and deletes entries:
    RuntimeError "dictionary changed size during iteration" (a health check answered UNKNOWN;
    during start-up, a traceback out of `esp serve`)."""
    from serving.model_config import ModelSource
    from serving.server import ModelManager

    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "models.config"
    config.write_text("read by the stub below")
    reads = [0]

    def read_config(_path: str) -> list[ModelSource]:
        reads[0] += 1
        count = 40 if reads[0] % 2 else 1
        return [ModelSource(f"m{i}", str(empty)) for i in range(count)]

    manager = ModelManager(
        [ModelSource("m0", str(empty))], config_file=str(config), poll_wait_s=0, config_poll_wait_s=0.001,
        read_config=read_config,
    )
    stop = threading.Event()

    def touch() -> None:  # a new file identity each time: every poll is a reload
        n = 0
        while not stop.is_set():
            n += 1
            os.utime(config, ns=(n * 1_000_000, n * 1_000_000))
            time.sleep(0.0005)

    toucher = threading.Thread(target=touch, daemon=True)
    manager.start_polling()
    toucher.start()
    errors: list[BaseException] = []
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline and not errors:
            try:
                manager.all_available()
            except RuntimeError as exc:  # "dictionary changed size during iteration"
                errors.append(exc)
    finally:
        stop.set()
        toucher.join(5)
        manager.stop()
    assert errors == [], f"the health check raised during a config reload (after {reads[0]} reloads): {errors[0]!r}"
    assert reads[0] > 10, "the config was not reloaded often enough for the test to mean anything"


# ---------------------------------------------------------------------------------------------
# The command line


def _serve(args: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Runs `esp serve ARGS`; (exit code, stderr), or (None, stderr so far) if it was still running."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        result = subprocess.run([sys.executable, "-m", "esp.cli.main", "serve", *args], capture_output=True,
                                text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed its own child
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return None, err
    return result.returncode, result.stderr


def test_an_empty_model_base_path_is_a_one_line_error(tmp_path):
    """Found: `--model-base-path ""` (or ESP_MODEL_BASE_PATH= in an env file) becomes the current
    directory: the server listens, never has a version, never says why, and never exits. TF
    Serving refuses an empty model_base_path at start-up."""
    code, stderr = _serve(["--model-base-path", "", "--port", "0"], timeout_s=45)
    assert code is not None, f"esp serve with an empty --model-base-path was still running after 45 s:\n{stderr[-2000:]}"
    assert code != 0 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("esp: error:")], stderr[-2000:]


def test_a_base_path_without_versions_says_so(tmp_path, test_model_base):
    """Found: pointed at a version directory instead of its parent (a common slip), esp serve
    listens and waits forever without a word: nothing in its log says that no version was found.
    TF Serving logs on every poll: "No versions of servable bert found under base path ...
    Did you forget to name your leaf directory as a number (eg. '/1/')?"."""
    code, stderr = _serve(["--model-base-path", str(test_model_base / "1"), "--port", "0"], timeout_s=30)
    assert "no version" in stderr.lower() or code not in (None, 0), stderr[-2000:]


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--model-base-path", "{base}", "--port", "0", "--max-message-bytes", "3000000000"],
        ["serve", "--model-base-path", "{base}", "--port", "0", "--grpc-channel-arguments", "grpc.max_connection_age_ms=99999999999"],
        ["score", "--model-server", "127.0.0.1:1", "--model-max-message-bytes", "3000000000", "hello"],
    ],
    ids=["serve-max-message-bytes", "serve-channel-argument", "score-max-message-bytes"],
)
def test_a_grpc_size_beyond_int32_is_a_one_line_error(test_model_base, args):
    """Found: gRPC takes its options as C ints; 3000000000 (a "3 GB to be safe" message size, or
    ESP_SERVE_MAX_MESSAGE_BYTES / ESP_MODEL_MAX_MESSAGE_BYTES) passes the settings' checks and then
    ends `esp serve` (after TensorFlow has loaded) and the client (`esp score`, the worker) in a
    Traceback: OverflowError: value too large to convert to int."""
    argv = [a.replace("{base}", str(test_model_base)) for a in args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "esp.cli.main", *argv], capture_output=True, text=True,
                            timeout=90, env=env, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert [line for line in result.stderr.splitlines() if line.startswith("esp: error:")], result.stderr[-1500:]
