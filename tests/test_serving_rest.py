"""`esp serve` answers TF Serving's REST model status, metadata and Prometheus page as TF Serving
does (the production Deployment's probes and PodMonitoring read them), and its gRPC side carries
Pub/Sub-sized messages."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from esp.localstack import free_port
from serving import esp_tfs_pb2 as pb
from serving.client import PREDICT_METHOD, TFServingScorer, channel_options, string_tensor
from serving.local import ModelServerProcess
from tests.fixtures.model_server import rest_get

MONITORING_CONFIG = Path(__file__).resolve().parents[1] / "serving" / "config" / "monitoring.config"
METRICS_PATH = "/monitoring/prometheus/metrics"
PUBSUB_MAX_MESSAGE_BYTES = 10 * 1000 * 1000


@pytest.fixture(scope="module")
def rest_server(test_model_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    server = ModelServerProcess(
        test_model_base,
        rest_api_port=free_port(),
        extra_args=["--monitoring-config-file", str(MONITORING_CONFIG)],
        log_path=tmp_path_factory.mktemp("rest") / "esp-serve.log",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


_get = rest_get


def test_model_status_as_tf_serving_answers_it(rest_server: ModelServerProcess) -> None:
    expected = {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    for path in ("/v1/models/bert", "/v1/models/bert/versions/1", "/V1/MODELS/bert"):
        code, body = _get(rest_server, path)
        assert code == 200 and json.loads(body) == expected, (path, body)


@pytest.mark.parametrize(
    "path, code, error",
    [
        ("/v1/models/nope", 404, "Servable not found for request: Latest(nope)"),
        ("/v1/models/bert/versions/9", 404, "Could not find version 9 of model bert"),
        ("/v1/models", 400, "Missing model name in request."),
        ("/v1/models/bert:predict", 400, "Malformed request: GET /v1/models/bert:predict"),
    ],
)
def test_errors_as_tf_serving_answers_them(rest_server: ModelServerProcess, path: str, code: int, error: str) -> None:
    got, body = _get(rest_server, path)
    assert got == code and json.loads(body) == {"error": error}


def test_paths_outside_the_api_are_not_found(rest_server: ModelServerProcess) -> None:
    assert _get(rest_server, "/healthz")[0] == 404


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for pid {pid}")


def test_a_flood_of_idle_connections_holds_no_threads_and_probes_still_answer(rest_server: ModelServerProcess) -> None:
    """Anything that reaches a probe port (a port scan, a scraper gone wrong, a hostile pod) may open
    connections and send nothing. The endpoint (esp.http_endpoint, also the worker's health port)
    gives them no thread each, keeps the probe answering while 600 are open (more than it keeps:
    the longest-waiting are closed to make room), and closes any that stays silent."""
    threads_before = _threads(rest_server.pid)
    idle: list[socket.socket] = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", rest_server.rest_api_port), timeout=10))
        started = time.monotonic()
        assert _get(rest_server, "/v1/models/bert")[0] == 200
        assert time.monotonic() - started < 2.0, "the probe waited behind idle connections"
        grown = _threads(rest_server.pid) - threads_before
        assert grown < 10, f"{grown} more threads in esp serve with {len(idle)} idle connections open"
        # The newest idle connection was not closed for room: it is closed for saying nothing in 5 s.
        started = time.monotonic()
        assert idle[-1].recv(1000).startswith(b"HTTP/1.1 408 "), "an idle connection got no timeout answer"
        assert time.monotonic() - started < 5.0 + 2.0
    finally:
        for sock in idle:
            sock.close()
    # A head that never ends is refused, not buffered.
    with socket.create_connection(("127.0.0.1", rest_server.rest_api_port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models/bert HTTP/1.1\r\nX-Filler: " + b"a" * (64 * 1024))
        assert sock.recv(1000).startswith(b"HTTP/1.1 431 ")
    assert _get(rest_server, "/v1/models/bert")[0] == 200


def _raw(server: ModelServerProcess, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.rest_api_port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # the endpoint closes every connection after its answer
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "request_bytes, status, answer_part",
    [
        (b"GARBAGE\r\n\r\n", 400, b"malformed request line"),
        (b"GET /v1/models/bert\r\n\r\n", 400, b"malformed request line"),  # no HTTP version
        (b"GET /v1/models/bert \x00\xff\xfe\r\n\r\n", 400, b"malformed request line"),
        (b"POST /v1/models/bert HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, b"Allow: GET, HEAD"),
        (b"DELETE /v1/models/bert HTTP/1.1\r\n\r\n", 405, b"Allow: GET, HEAD"),
        (b"GET /v1/models/\xff\x00bert HTTP/1.1\r\n\r\n", 404, b"Servable not found"),
        (b"GET http://elsewhere.example/v1/models/bert HTTP/1.1\r\n\r\n", 200, b'"state": "AVAILABLE"'),
        (b"GET /v1/models/bert?x=%00%ff HTTP/1.1\r\n\r\n", 200, b'"state": "AVAILABLE"'),
        (b"GET /v1/models/bert/../../../etc/passwd HTTP/1.1\r\n\r\n", 400, b"Malformed request"),
    ],
)
def test_hostile_request_lines_get_a_status_and_the_endpoint_stays_up(
    rest_server: ModelServerProcess, request_bytes: bytes, status: int, answer_part: bytes
) -> None:
    answer = _raw(rest_server, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert answer_part in answer, answer[:600]
    head = _raw(rest_server, b"HEAD /v1/models/bert HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), "HEAD answers the head only"


def test_model_metadata_as_tf_serving_answers_it(rest_server: ModelServerProcess) -> None:
    code, body = _get(rest_server, "/v1/models/bert/metadata")
    assert code == 200
    metadata = json.loads(body)
    assert metadata["model_spec"] == {"name": "bert", "version": "1", "signature_name": ""}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["text"]["dtype"] == "DT_STRING"
    assert "toxic" in signature["outputs"]


def test_prometheus_page_at_the_monitoring_config_path(rest_server: ModelServerProcess) -> None:
    with TFServingScorer(rest_server.target, timeout_s=10, retry_budget_s=2) as scorer:
        scorer.predict(["hello there"])
    code, page = _get(rest_server, METRICS_PATH)
    assert code == 200
    # TF Serving's own series, which the model-errors alert reads, and esp serve's.
    assert ':tensorflow:serving:request_count{model_name="bert",status="OK"}' in page
    assert "esp_serve_requests_total" in page


def test_model_names_a_client_makes_up_are_not_series_of_their_own(rest_server: ModelServerProcess) -> None:
    """The request counter's model_name came from the request: every made-up name was a new series,
    so a client could grow the server's memory and the metrics page without bound."""
    from esp.scoring import ModelNotFound

    names = [f"no-such-model-{i}" for i in range(20)]
    for name in names:
        with TFServingScorer(rest_server.target, model_name=name, timeout_s=10, retry_budget_s=1) as scorer, pytest.raises(ModelNotFound):
            scorer.predict(["hello"])
    code, page = _get(rest_server, METRICS_PATH)
    assert code == 200
    assert not [n for n in names if n in page]
    [line] = [x for x in page.splitlines() if x.startswith(':tensorflow:serving:request_count{model_name="",status="NOT_FOUND"}')]
    assert float(line.split()[-1]) >= len(names)


def test_pubsub_sized_messages_cross_the_grpc_channel(rest_server: ModelServerProcess) -> None:
    """A request bigger than Pub/Sub's 10 MB limit goes through on ESP's client channel options
    (gRPC's default is 4 MiB) and is judged by the server, not refused by the transport."""
    request = pb.PredictRequest()
    request.model_spec.name = "bert"
    request.inputs["text"].CopyFrom(string_tensor(["hello"]))
    request.inputs["padding"].CopyFrom(string_tensor(["x" * (PUBSUB_MAX_MESSAGE_BYTES + 1_000_000)]))
    assert request.ByteSize() > PUBSUB_MAX_MESSAGE_BYTES
    options = channel_options(256 * 1024 * 1024, 60.0)
    with grpc.insecure_channel(rest_server.target, options=list(options)) as channel:
        predict = channel.unary_unary(PREDICT_METHOD, request_serializer=pb.PredictRequest.SerializeToString,
                                      response_deserializer=pb.PredictResponse.FromString)
        with pytest.raises(grpc.RpcError) as raised:
            predict(request, timeout=60)
    # The server read it all and refused the unknown input, as TF Serving would.
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
