"""`esp api` as a real process over real HTTP, with `esp serve` (the test model over real gRPC) behind it.

Scores equal the in-process model's; every limit and error path answers its own status and reason;
429 and 503 come with Retry-After under their conditions and the server recovers; concurrent
requests share batches (the engine's esp_batch_size metric); keys never reach the logs.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.keys import hash_key, new_key
from api.local import ApiProcess
from api.openapi import build_openapi
from esp.contracts import loads_json
from esp.localstack import free_port, wait_until
from esp.settings.api import ApiSettings
from tests.fixtures import perspective_docs as docs
from tests.fixtures.api import fast_batching
from tests.fixtures.models import TEST_LABELS, TEST_THRESHOLDS, export_test_model
from tests.fixtures.worker import jigsaw_comments

EXAMPLES = int(os.environ.get("ESP_HYPOTHESIS_EXAMPLES", "40"))
OPENAPI = build_openapi(ApiSettings())


def _json_schema(node: object) -> object:
    """OpenAPI 3.0's `nullable` as JSON Schema's type list, so jsonschema checks what the document means."""
    if isinstance(node, dict):
        out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable"):
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


def _schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}", "components": _json_schema(OPENAPI["components"])}


def _check(instance: object, name: str) -> None:
    jsonschema.validate(instance, _schema(name))


def _error(body: dict, status: int, reason: str | None = None, error_type: str | None = None) -> dict:
    _check(body, "Error")
    error = body["error"]
    assert error["code"] == status and error["message"]
    detail = error["details"][0]
    if reason is not None:
        assert detail["reason"] == reason, body
    if error_type is not None:
        assert detail["errorType"] == error_type, body
    return error


# ---------------------------------------------------------------------------------------------
# Scores


def _flags(scores: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """The labels whose score reached the model's threshold, in the record's label order."""
    return [label for label, p in scores.items() if p >= thresholds[label]]


def test_scores_match_the_in_process_model(shared_api: ApiProcess, test_model_base: Path) -> None:
    from serving.saved_model import SavedModelScorer

    texts = [t for _, t in jigsaw_comments(12)] + ["naïve café ☕ — “quotes”", "😀 emoji and \u200b zero width", "x"]
    scorer = SavedModelScorer(str(test_model_base))
    try:
        expected = scorer.predict(texts)
    finally:
        scorer.close()
    # The thresholds are the model's own (its esp_threshold_<label> outputs), not a constant of the API.
    assert expected.thresholds == pytest.approx(TEST_THRESHOLDS)
    status, _, many = shared_api.post_json("/v1/score", {"comments": [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)]})
    assert status == 200 and many["errors"] == []
    _check(many, "ScoreList")
    for i, record in enumerate(many["scores"]):
        _check(record, "ScoreRecord")
        assert record["id"] == f"c{i}" and record["schema_version"] == "1" and record["model"] == {"name": "bert", "version": 1}
        for j, label in enumerate(expected.labels):
            assert abs(record["scores"][label] - expected.probabilities[i][j]) <= 1e-5, (i, label)
        assert record["flags"] == _flags(record["scores"], expected.thresholds), (i, record)
    # Both sides of every threshold are crossed: "x" is flagged under the test model, the rest are not.
    assert [bool(r["flags"]) for r in many["scores"]] == [t == "x" for t in texts]
    # One comment alone: the same record shape, the same scores.
    status, headers, one = shared_api.post_json("/v1/score", {"text": texts[0]})
    assert status == 200 and one["id"].startswith("req-") and headers["content-type"] == "application/json"
    assert all(abs(one["scores"][label] - many["scores"][0]["scores"][label]) <= 1e-5 for label in TEST_LABELS)
    assert one["flags"] == [label for label in expected.labels if label in one["flags"]], "flags in the model's label order"
    assert one["flags"] == _flags(one["scores"], expected.thresholds)
    # Perspective's summary score is the same probability under its attribute name.
    status, _, analyzed = shared_api.post_json(
        "/v1alpha1/comments:analyze", {"comment": {"text": texts[0]}, "requestedAttributes": {"TOXICITY": {}, "IDENTITY_ATTACK": {}}}
    )
    assert status == 200
    _check(analyzed, "AnalyzeCommentResponse")
    assert abs(analyzed["attributeScores"]["TOXICITY"]["summaryScore"]["value"] - expected.probabilities[0][expected.labels.index("toxic")]) <= 1e-5
    assert abs(analyzed["attributeScores"]["IDENTITY_ATTACK"]["summaryScore"]["value"] - one["scores"]["identity_hate"]) <= 1e-5


def test_perspective_documented_examples_over_http(shared_api: ApiProcess) -> None:
    # The documented request asks for UNSUBSTANTIAL too, which ESP's model does not have: refused by name.
    status, _, body = shared_api.post_json("/v1alpha1/comments:analyze", docs.ANALYZE_REQUEST)
    assert status == 400 and "Unknown requested attribute: UNSUBSTANTIAL" in _error(body, 400, error_type="INVALID_REQUEST")["message"]
    request = {**docs.ANALYZE_REQUEST, "requestedAttributes": {"TOXICITY": {}}}
    status, _, body = shared_api.post_json("/v1alpha1/comments:analyze", request)
    assert status == 200
    assert docs.shape(body["attributeScores"]) == {"TOXICITY": docs.shape(docs.ANALYZE_RESPONSE["attributeScores"]["TOXICITY"])}
    assert body["languages"] == docs.ANALYZE_RESPONSE["languages"]

    spanned = {**request, "spanAnnotations": True}
    status, _, body = shared_api.post_json("/v1alpha1/comments:analyze", spanned)
    assert status == 200
    assert docs.shape(body["attributeScores"]["TOXICITY"]) == docs.shape(docs.ANALYZE_RESPONSE["attributeScores"]["UNSUBSTANTIAL"])
    spans = body["attributeScores"]["TOXICITY"]["spanScores"]
    assert [(s["begin"], s["end"]) for s in spans] == docs.ANALYZE_SPANS_PROSE
    # Each span is that sentence scored alone.
    for span, sentence in zip(spans, ["What kind of idiot name is foo?", "Sorry, I like your name."]):
        alone = shared_api.post_json("/v1/score", {"text": sentence})[2]
        assert abs(span["score"]["value"] - alone["scores"]["toxic"]) <= 1e-5

    issue = {**docs.ISSUE_REQUEST, "comment": {"text": "You are an idiot, and a liar", "type": "PLAIN_TEXT"},
             "requestedAttributes": {"TOXICITY": {"scoreType": "PROBABILITY", "scoreThreshold": 0.0}}}
    status, _, body = shared_api.post_json("/v1alpha1/comments:analyze", issue)
    assert status == 200 and docs.shape(body) == docs.shape(docs.ISSUE_RESPONSE)
    assert body["clientToken"] == "abc" and body["detectedLanguages"] == ["en"]

    status, _, body = shared_api.post_json("/v1alpha1/comments:analyze", {**issue, "languages": ["xx"]})
    error = _error(body, 400, error_type="LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE")
    assert error["details"][0]["languageNotSupportedByAttributeError"] == docs.ISSUE_LANGUAGE_ERROR["error"]["details"][0]["languageNotSupportedByAttributeError"]
    status, _, body = shared_api.post_json("/v1alpha1/comments:analyze", {"comment": {"text": ""}, "requestedAttributes": {"TOXICITY": {}}})
    assert docs.shape(body) == docs.shape(docs.COMMENT_EMPTY_ERROR) and body == docs.COMMENT_EMPTY_ERROR


# ---------------------------------------------------------------------------------------------
# Limits and errors


def test_every_limit_and_error_path_has_its_status_and_reason(start_api, shared_api) -> None:
    api = start_api(ApiSettings(api_max_body_bytes=4096, api_max_comments=3, api_max_text_bytes=200, api_max_spans=2))
    big = b'{"text": "' + b"a" * 5000 + b'"}'
    cases = [
        ("POST", "/v1/score", big, 413, "body_too_large"),
        ("POST", "/v1/score", {"comments": [{"text": "a"}] * 4}, 413, "too_many_comments"),
        ("POST", "/v1/score", {"text": "é" * 101}, 413, "text_too_long"),
        ("POST", "/v1/score", b"", 400, "invalid_json"),
        ("POST", "/v1/score", b'{"text": "unterminated', 400, "invalid_json"),
        ("POST", "/v1/score", b'{"text": "\xff\xfe"}', 400, "invalid_utf8"),
        # Read as the stream reads it (esp.contracts.loads_json): never one of two possible texts.
        ("POST", "/v1/score", b'{"text": "kind words", "text": "abuse"}', 400, "invalid_json"),
        ("POST", "/v1/score", b'{"text": "a", "weight": NaN}', 400, "invalid_json"),
        ("POST", "/v1/score", b'\xef\xbb\xbf{"text": "a"}', 400, "invalid_json"),
        ("POST", "/v1/score", {"text": " "}, 400, "empty_text"),
        ("POST", "/v1/score", {"text": 3}, 400, "non_string_text"),
        ("POST", "/v1/score", {"id": 7, "text": "a"}, 400, "invalid_id"),
        ("POST", "/v1/score", {"txt": "a"}, 400, "invalid_request"),
        ("POST", "/v1/score", [], 400, "not_an_object"),
        ("GET", "/v1/score", None, 405, "method_not_allowed"),
        ("POST", "/nope", {"text": "a"}, 404, "not_found"),
        ("OPTIONS", "/v1/score", None, 403, "cors_origin_not_allowed"),
    ]
    for method, path, body, status, reason in cases:
        raw = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        got, headers, payload = api.request(method, path, raw)
        assert got == status, (method, path, got, payload[:300])
        _error(json.loads(payload), status, reason=reason)
    got, _, payload = api.request("POST", "/v1/score", gzip.compress(b'{"text": "a"}'), headers={"Content-Encoding": "gzip"})
    assert got == 415 and "Content-Encoding 'gzip'" in _error(json.loads(payload), 415, reason="unsupported_media_type")["message"]
    deep = b'{"text": "a", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    huge_number = b'{"text": "a", "id": ' + b"9" * 5000 + b"}"  # past CPython's 4,300-digit int limit
    for body, problem in ((deep, "nested too deeply"), (huge_number, "digits")):
        got, _, payload = shared_api.request("POST", "/v1/score", body)  # within the default body limit
        assert got == 400 and problem in _error(json.loads(payload), 400, reason="invalid_json")["message"]
    perspective = [
        ({"comment": {"text": "a" * 201}, "requestedAttributes": {"TOXICITY": {}}}, "COMMENT_TOO_LONG"),
        ({"comment": {"text": "a"}, "requestedAttributes": {}}, "NO_REQUESTED_ATTRIBUTES"),
        ({"comment": {"text": "A. B. C."}, "requestedAttributes": {"TOXICITY": {}}, "spanAnnotations": True}, "INVALID_REQUEST"),
        ({"comment": {"text": "a"}, "requestedAttributes": {"TOXICITY": {"scoreType": "RAW"}}}, "INVALID_REQUEST"),
    ]
    for body, error_type in perspective:
        got, _, payload = api.post_json("/v1alpha1/comments:analyze", body)
        assert got == 400
        _error(payload, 400, error_type=error_type)
    got, _, payload = api.post_json("/v1alpha1/comments:analyze", big)
    assert got == 413 and _error(payload, 413, error_type="COMMENT_TOO_LONG")
    # After every refusal above the server still scores (bodies that never end or stall: the test below).
    got, _, payload = api.post_json("/v1/score", {"text": "fine"})
    assert got == 200
    assert "Traceback" not in api.log_path.read_text()  # type: ignore[union-attr]


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """One HTTP answer read from a raw socket: (status, headers with lower-case names, JSON body)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())


def test_a_body_past_its_size_or_its_time_is_cut_off_and_a_client_that_leaves_costs_nothing(start_api) -> None:
    """Over raw sockets, the bodies an HTTP library will not send: chunked with no end (no
    Content-Length to refuse up front), short of its Content-Length and stalled, and abandoned
    halfway by a client that closes. 413 and 408 come with their reasons and close the connection;
    a client that leaves is noticed at once, and the server answers the next request as usual."""
    api = start_api(ApiSettings(api_max_body_bytes=4096, api_max_text_bytes=200, api_read_timeout_s=1.0))
    head = b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"3e8\r\n" + b" " * 1000 + b"\r\n"  # 1,000 bytes of body

    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        # 5,000 bytes past a 4,096-byte limit, and never the last chunk: only the limit on what
        # was read so far can answer this. One write, so nothing unread is left to reset the answer.
        sock.sendall(chunked + chunk * 5)
        status, headers, body = _answer(sock)
        assert status == 413 and headers["connection"] == "close", (status, headers)
        error = _error(body, 413, reason="body_too_large")
        assert error["details"][0]["metadata"] == {"limit": "4096"} and "the limit is 4096" in error["message"]
        assert sock.recv(1) == b"", "the server closed the connection instead of reading on"

    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"text": "')  # 10 of the 100 bytes, then nothing
        started = time.monotonic()
        status, headers, body = _answer(sock)
        waited = time.monotonic() - started
        assert status == 408 and headers["connection"] == "close", (status, headers)
        assert "within 1 s" in _error(body, 408, reason="read_timeout")["message"]
        assert 1.0 - 0.25 <= waited < 1.0 + 2.0, f"answered 408 after {waited:.2f} s, the read timeout is 1 s"
        assert sock.recv(1) == b""

    openings = [
        head + b"Content-Length: 100\r\n\r\n",  # the head, and none of the body
        head + b"Content-Length: 100\r\n\r\n" + b'{"text": "' + b"h" * 40,  # half the body
        chunked + chunk,  # one chunk of a chunked body
    ]
    for opening in openings:
        left = api.metric("esp_api_errors_total", reason="invalid_request")
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            sock.sendall(opening)
        # Noticed as the client leaving, well before a read timeout would end the wait (read_timeout).
        wait_until(lambda: api.metric("esp_api_errors_total", reason="invalid_request") == left + 1,
                   timeout_s=10, what="the API to notice the client went away")
        assert api.request("GET", "/healthz")[0] == 200
        status, _, one = api.post_json("/v1/score", {"text": "fine, right after"})
        assert status == 200 and set(one["scores"]) == set(TEST_LABELS)
    assert api.metric("esp_api_errors_total", reason="read_timeout") == 1, "only the stalled body timed out"
    assert "Traceback" not in api.log_path.read_text()  # type: ignore[union-attr]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _write_calls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw for pid {pid}")


def test_each_answer_leaves_in_one_write(start_api) -> None:
    """uvicorn writes a response's head, then its body: two system calls, two TCP segments and two
    wake-ups of the client per answer. The API sends both in one write. Counted by the kernel
    (the process's write calls in /proc/PID/io) over keep-alive requests."""
    api = start_api()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        answers = 200
        for i in range(answers + 1):
            if i == 1:  # the first request warmed the connection
                before = _write_calls(api.pid)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"ok\n")
        writes = _write_calls(api.pid) - before
    finally:
        conn.close()
    # A little headroom for the process's other writes (an idle probe of the model server).
    assert writes < 1.25 * answers, f"{writes} write calls for {answers} answers"


def test_an_endless_or_trickling_request_head_is_cut_off(start_api) -> None:
    """Before any key is checked, a client can send a header line that never ends (httptools sets
    no limit: the API would buffer all of it) or a head that never completes (holding the
    connection forever). Both are cut off: 431 past 64 KiB, the connection closed after the read
    timeout, and the API's memory does not grow with what was sent."""
    api = start_api(ApiSettings(api_read_timeout_s=1.0))
    before = _rss_mib(api.pid)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: ")
            for _ in range(48):
                sock.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except OSError:
            pass  # the server closed the connection, as it should
        try:
            answer = sock.recv(1000)
        except OSError:
            pass  # a reset can overtake the answer
    grown = _rss_mib(api.pid) - before
    assert sent < 8 << 20, f"the API read {sent >> 20} MiB of one header line without cutting it off"
    assert grown < 16, f"the API's RSS grew by {grown:.0f} MiB while {sent >> 20} MiB of one header line arrived"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer
    for opening in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # nothing at all; a head that stops
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            sock.sendall(opening)
            started = time.monotonic()
            assert sock.recv(1000) == b"", "the server answered a request that never arrived"
            assert time.monotonic() - started < 1.0 + 2.0, "the incomplete head held its connection past the read timeout"
    assert api.request("GET", "/healthz")[0] == 200


SCORING_PATHS = ["/v1/score", "/v1alpha1/comments:analyze", "/v1alpha1/comments:suggestscore"]


def _reason(body: dict, status: int) -> str:
    """The error's reason: ESP's on /v1/score and for errors Perspective has no type for, else Perspective's errorType."""
    detail = _error(body, status)["details"][0]
    reason = detail.get("errorType") or detail.get("reason")
    assert reason, body
    return reason


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode), path=st.sampled_from(SCORING_PATHS))
def test_hostile_bodies_never_get_a_500(shared_api: ApiProcess, body: bytes, path: str) -> None:
    status, _, payload = shared_api.request("POST", path, body)
    assert status < 500 or status == 503, (status, payload[:300])
    if status != 200:
        _error(json.loads(payload), status)
    try:
        loads_json(body.decode("utf-8"))
    except (ValueError, RecursionError):  # not JSON to the API's reader: the client's fault, never an outage
        assert 400 <= status < 500 and _reason(json.loads(payload), status), (status, payload[:300])


# Valid JSON nested 1,000 deep: refused when read (Python's recursion limit) or, by a reader that
# takes it, by the field's own check; never a crash (a repr of it once answered 500).
DEEP = "[" * 1000 + "]" * 1000


def test_hostile_json_is_refused_with_a_reason(shared_api: ApiProcess) -> None:
    unreadable = {
        "nested past 1,024 levels": b'{"text": ' + b"[" * 1100 + b"]" * 1100 + b"}",
        "a 5,000-digit id": b'{"id": ' + b"9" * 5000 + b', "text": "t"}',
        "NaN": b'{"text": NaN}',
        "Infinity": b'{"id": Infinity, "text": "t"}',
        "-Infinity": b'{"text": "t", "n": -Infinity}',
    }
    for path in SCORING_PATHS:
        for name, body in unreadable.items():
            status, _, payload = shared_api.request("POST", path, body)
            assert status == 400, (path, name, status, payload[:300])
            assert _reason(json.loads(payload), 400) == ("invalid_json" if path == "/v1/score" else "INVALID_REQUEST"), (path, name)
    # Deep values where each endpoint reads a field: refused by that field's check, not by a crash.
    deep_fields = [
        ("/v1/score", '{"text": @}'), ("/v1/score", '{"id": @, "text": "t"}'), ("/v1/score", '{"comments": [@]}'),
        ("/v1/score", '{"comments": [{"text": @}]}'), ("/v1/score", "@"),
        *(("/v1alpha1/comments:analyze", '{"comment": {"text": "t"}, "requestedAttributes": {"TOXICITY": {}}, ' + f + "}") for f in (
            '"languages": @', '"languages": [@]', '"clientToken": @', '"spanAnnotations": @', '"context": @',
            '"context": {"entries": [@]}', '"context": {"entries": [{"text": "t", "type": @}]}')),
        ("/v1alpha1/comments:analyze", '{"comment": {"text": @}, "requestedAttributes": {"TOXICITY": {}}}'),
        ("/v1alpha1/comments:analyze", '{"comment": {"text": "t", "type": @}, "requestedAttributes": {"TOXICITY": {}}}'),
        ("/v1alpha1/comments:analyze", '{"comment": {"text": "t"}, "requestedAttributes": @}'),
        ("/v1alpha1/comments:analyze", '{"comment": {"text": "t"}, "requestedAttributes": {"TOXICITY": @}}'),
        ("/v1alpha1/comments:analyze", '{"comment": {"text": "t"}, "requestedAttributes": {"TOXICITY": {"scoreType": @}}}'),
        ("/v1alpha1/comments:analyze", '{"comment": {"text": "t"}, "requestedAttributes": {"TOXICITY": {"scoreThreshold": @}}}'),
        ("/v1alpha1/comments:suggestscore", '{"comment": {"text": "t", "type": @}, "attributeScores": {"TOXICITY": {"summaryScore": {"value": 1}}}}'),
        ("/v1alpha1/comments:suggestscore", '{"comment": {"text": "t"}, "attributeScores": {"TOXICITY": {"summaryScore": {"value": @}}}}'),
        ("/v1alpha1/comments:suggestscore", '{"comment": {"text": "t"}, "attributeScores": {"TOXICITY": {"summaryScore": {"value": 1, "type": @}}}}'),
        ("/v1alpha1/comments:suggestscore", '{"comment": {"text": "t"}, "attributeScores": {"TOXICITY": {"spanScores": [{"begin": @, "end": 1}]}}}'),
    ]
    for path, template in deep_fields:
        status, _, payload = shared_api.request("POST", path, template.replace("@", DEEP).encode())
        assert status == 400, (path, template, status, payload[:300])
        _reason(json.loads(payload), 400)

    # A repeated key and a byte order mark: refused like on the stream (esp.contracts.loads_json).
    for path in SCORING_PATHS:
        for body in (b'{"id": "d", "text": "a", "text": "b"}', b'\xef\xbb\xbf{"text": "a"}'):
            status, _, payload = shared_api.request("POST", path, body)
            assert status == 400, (path, status, payload[:300])
            assert _reason(json.loads(payload), 400) == ("invalid_json" if path == "/v1/score" else "INVALID_REQUEST"), path
    assert shared_api.post_json("/v1/score", {"text": "still fine"})[0] == 200


def test_model_refusing_one_comment_answers_422_and_its_neighbours_are_scored(start_api, start_model_server, tmp_path: Path) -> None:
    base = tmp_path / "rejecting"
    export_test_model(base, 1, reject_marker="<<POISON>>")
    server = start_model_server(base)
    api = start_api(model_server=server)
    status, _, body = api.post_json("/v1/score", {"comments": [{"id": "a", "text": "fine"}, {"id": "b", "text": "bad <<POISON>>"}, {"id": "c", "text": "ok"}]})
    assert status == 200 and [s["id"] for s in body["scores"]] == ["a", "c"]
    (error,) = body["errors"]
    assert error["index"] == 1 and error["id"] == "b" and error["error_type"] == "model_rejected" and "<<POISON>>" in error["reason"]
    status, _, body = api.post_json("/v1/score", {"text": "alone <<POISON>>"})
    assert status == 422 and _error(body, 422, reason="model_rejected")
    status, _, body = api.post_json("/v1alpha1/comments:analyze", {"comment": {"text": "alone <<POISON>>"}, "requestedAttributes": {"TOXICITY": {}}})
    assert status == 422 and _error(body, 422, error_type="INVALID_REQUEST")
    assert api.post_json("/v1/score", {"text": "still fine"})[0] == 200


# ---------------------------------------------------------------------------------------------
# Backpressure, outages, batching


def test_outage_answers_503_within_the_deadline_a_full_queue_429_and_both_recover(start_api, start_model_server, test_model_base: Path) -> None:
    # One model server restart serves both conditions: starting TensorFlow is the slow part.
    server = start_model_server(test_model_base)
    api = start_api(ApiSettings(api_max_queued=4, api_request_deadline_s=1.5), model_server=server)
    assert api.post_json("/v1/score", {"text": "warm"})[0] == 200
    server.kill()

    started = time.monotonic()
    status, headers, body = api.post_json("/v1/score", {"text": "while down"})
    elapsed = time.monotonic() - started
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert "model server" in _error(body, 503, reason="model_unavailable")["message"]
    assert elapsed < 1.5 + 1.5, elapsed
    wait_until(lambda: api.request("GET", "/readyz")[0] == 503, timeout_s=10, what="/readyz to say not ready")
    assert b"model server unavailable" in api.request("GET", "/readyz")[2]

    # Nothing leaves the queue while the model is down: four wait, the fifth is refused at once.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(api.post_json, "/v1/score", {"text": f"queued {i}"}) for i in range(4)]
        wait_until(lambda: api.metric("esp_engine_queued") >= 4, timeout_s=5, what="four comments queued")
        started = time.monotonic()
        status, headers, body = api.post_json("/v1/score", {"text": "one too many"})
        assert status == 429 and int(headers["retry-after"]) >= 1 and time.monotonic() - started < 1.0
        _error(body, 429, reason="queue_full")
        assert [f.result()[0] for f in waiting] == [503] * 4  # their deadline passed during the outage

    server.start()
    wait_until(lambda: api.request("GET", "/readyz")[0] == 200, timeout_s=60, what="/readyz 200 after the model server is back")
    assert api.post_json("/v1/score", {"text": "back"})[0] == 200


def test_a_frozen_model_server_gets_every_request_a_503_within_its_deadline(start_api, start_model_server, test_model_base: Path) -> None:
    """A model server that accepts connections and never answers (SIGSTOP: a hung pod, a blackhole)
    holds the engine's threads for the model client's whole RPC timeout (5 s here). Requests must
    not wait for it: before the first batch (analyze asks the model for its labels), with a batch
    stuck at the model server, and while the engine's probe hangs, each answers 503 + Retry-After
    by its own 2 s deadline."""
    server = start_model_server(test_model_base)
    api = start_api(ApiSettings(api_request_deadline_s=2.0), model_server=server)  # ready, nothing scored yet
    limit_s = 2.0 + 0.5  # the deadline, plus HTTP on a shared 2-core machine

    def timed(path: str, body: dict) -> tuple[int, str | None, float]:
        started = time.monotonic()
        status, headers, _ = api.post_json(path, body, timeout_s=60)
        return status, headers.get("retry-after"), time.monotonic() - started

    analyze = {"comment": {"text": "you are great"}, "requestedAttributes": {"TOXICITY": {}}}
    server.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            first = [pool.submit(timed, "/v1alpha1/comments:analyze", analyze) for _ in range(6)]
            first += [pool.submit(timed, "/v1/score", {"text": f"frozen {i}"}) for i in range(6)]
            answers = [f.result() for f in first]
        end = time.monotonic() + 6  # past the client's 5 s RPC timeout: the engine is in its outage now
        while time.monotonic() < end:
            answers.append(timed("/v1/score", {"text": "still frozen"}))
    finally:
        server.send_signal(signal.SIGCONT)
    late = [(status, retry, round(t, 1)) for status, retry, t in answers if status != 503 or retry is None or t > limit_s]
    assert not late, f"{len(late)} of {len(answers)} answers were not a 503 with Retry-After within {limit_s} s: {late}"
    wait_until(lambda: api.post_json("/v1/score", {"text": "thawed"})[0] == 200, timeout_s=60, what="scoring after SIGCONT")
    assert api.post_json("/v1alpha1/comments:analyze", analyze)[0] == 200


def test_a_request_is_queued_whole_or_not_at_all(start_api) -> None:
    """The model server is unreachable, so nothing leaves the engine's queue (4 places): a
    3-comment request behind a 2-comment one is refused 429 and leaves none of its comments queued
    (scored for nobody, taking places); one with more comments than the queue holds is a 413."""
    api = start_api(
        ApiSettings(api_max_queued=4, api_request_deadline_s=5.0), client={"model_server": f"127.0.0.1:{free_port()}"},
        wait_for_ready=False,
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(api.post_json, "/v1/score", {"comments": [{"text": "a"}, {"text": "b"}]})
        wait_until(lambda: api.metric("esp_engine_queued") == 2, timeout_s=5, what="two comments queued")
        status, headers, body = api.post_json("/v1/score", {"comments": [{"text": f"c{i}"} for i in range(3)]})
        assert status == 429 and int(headers["retry-after"]) >= 1
        _error(body, 429, reason="queue_full")
        assert api.metric("esp_engine_queued") == 2, "the refused request left comments queued"
        status, _, body = api.post_json("/v1/score", {"comments": [{"text": f"d{i}"} for i in range(5)]})
        assert status == 413 and "ESP_API_MAX_QUEUED" in _error(body, 413, reason="too_many_comments")["message"]
        assert waiting.result()[0] == 503  # its deadline passed with the model server unreachable


def test_concurrent_single_comment_requests_share_batches(start_api) -> None:
    api = start_api(fast_batching(max_batch_size=32, max_batch_latency_ms=50.0, batches_in_flight=1))
    texts = [t for _, t in jigsaw_comments(64)]
    before_count, before_sum = api.metric("esp_batch_size_count"), api.metric("esp_batch_size_sum")
    barrier = threading.Barrier(32)

    def one(text: str) -> int:
        barrier.wait(timeout=10)
        return api.post_json("/v1/score", {"text": text})[0]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(one, texts))
    assert statuses == [200] * 64
    batches = api.metric("esp_batch_size_count") - before_count
    comments = api.metric("esp_batch_size_sum") - before_sum
    assert comments == 64
    assert batches <= 16, f"64 concurrent requests went out in {batches:.0f} Predict calls"


# ---------------------------------------------------------------------------------------------
# Keys, rate limits, CORS, logs


def test_keys_rate_limits_and_no_key_in_any_log(start_api, tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    keys = tmp_path / "keys"
    keys.write_text(f"alice {hash_key(alice)} 2 3\nbob {hash_key(bob)} 100 100\n")
    api = start_api(ApiSettings(api_keys_file=str(keys)))
    assert alice not in keys.read_text()
    status, _, body = api.post_json("/v1/score", {"text": "hi"})
    assert status == 401 and _error(body, 401, reason="missing_api_key")
    status, _, body = api.post_json("/v1/score?key=nope-" + alice[:10], {"text": "hi"})
    assert status == 403 and _error(body, 403, reason="invalid_api_key")
    assert api.post_json(f"/v1/score?key={alice}", {"text": "one"})[0] == 200
    assert api.post_json("/v1/score", {"comments": [{"text": "two"}, {"text": "three"}]}, headers={"X-Goog-Api-Key": alice})[0] == 200
    status, headers, body = api.post_json(f"/v1alpha1/comments:analyze?key={alice}", {"comment": {"text": "four"}, "requestedAttributes": {"TOXICITY": {}}})
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 2
    assert "alice" in _error(body, 429, reason="rate_limited")["message"]
    assert api.post_json(f"/v1/score?key={bob}", {"text": "bob has his own bucket"})[0] == 200
    # A parameter name spelled with percent escapes is still `key`: accepted, and masked in the log.
    assert api.post_json(f"/v1/score?monkey=1&%6Bey={bob}", {"text": "an encoded name"})[0] == 200
    time.sleep(int(headers["retry-after"]))
    assert api.post_json(f"/v1/score?key={alice}", {"text": "refilled"})[0] == 200
    # The page and the probes need no key.
    assert api.request("GET", "/")[0] == 200 and api.request("GET", "/readyz")[0] == 200
    # A malformed request line carrying the key: uvicorn refuses it, and still nothing logs the key.
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(f"POST /v1/score?key={alice} HTTP/1.1\r\nX-Goog-Api-Key: {bob}\r\nContent-Length: nope\r\n\r\n".encode())
        sock.recv(1000)
    api.stop()
    log = api.log_path.read_text()  # type: ignore[union-attr]
    assert "client=alice" in log and "key=REDACTED" in log
    assert alice not in log and bob not in log and alice[:10] not in log


def test_cors_allowlist(start_api) -> None:
    api = start_api(ApiSettings(api_cors_origins="https://app.example.com"))
    status, headers, _ = api.request(
        "OPTIONS", "/v1/score", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    )
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example.com"
    assert "X-Goog-Api-Key" in headers["access-control-allow-headers"]
    status, headers, body = api.request("OPTIONS", "/v1/score", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in headers
    _, headers, _ = api.post_json("/v1/score", {"text": "hi"}, headers={"Origin": "https://app.example.com"})
    assert headers["access-control-allow-origin"] == "https://app.example.com" and "Retry-After" in headers["access-control-expose-headers"]
    _, headers, _ = api.post_json("/v1/score", {"text": "hi"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


# ---------------------------------------------------------------------------------------------
# Docs, health, start-up, shutdown


def test_openapi_and_docs_are_served_offline(shared_api: ApiProcess) -> None:
    status, headers, raw = shared_api.request("GET", "/openapi.json")
    assert status == 200 and json.loads(raw)["paths"].keys() >= {"/v1/score", "/v1alpha1/comments:analyze", "/v1alpha1/comments:suggestscore"}
    status, headers, html = shared_api.request("GET", "/docs")
    assert status == 200 and b"/docs/swagger-ui-bundle.js" in html and b"http" not in html.split(b"<body>")[1]
    assert "default-src 'self'" in headers["content-security-policy"]
    for asset in ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/init.js", "/static/app.js", "/static/style.css"):
        assert shared_api.request("GET", asset)[0] == 200, asset
    for name, example in OPENAPI["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["examples"].items():
        status, _, body = shared_api.post_json("/v1/score", example["value"])
        assert status == 200, name
    metrics = shared_api.request("GET", "/metrics")[2].decode()
    for name in ("esp_api_requests_total", "esp_api_request_latency_seconds", "esp_batch_size", "esp_engine_queued", "esp_model_outage"):
        assert name in metrics, name


def test_startup_failures_are_one_line_and_sigterm_exits_zero(start_api, model_server, tmp_path: Path) -> None:
    api = start_api()
    env = {**os.environ, "ESP_MODEL_SERVER": model_server.target, "ESP_API_PORT": str(api.port)}
    taken = subprocess.run([sys.executable, "-m", "esp.cli.main", "api"], env=env, capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2 and taken.stderr.strip().splitlines() == [f"esp: error: port {api.port} on 127.0.0.1 is already in use (set --api-port, or 0 for a free one)"]
    bad_keys = tmp_path / "keys"
    bad_keys.write_text("alice notahash\n")
    env.update(ESP_API_PORT=str(free_port()), ESP_API_KEYS_FILE=str(bad_keys))
    broken = subprocess.run([sys.executable, "-m", "esp.cli.main", "api"], env=env, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and "line 1" in broken.stderr and "Traceback" not in broken.stderr

    assert api.post_json("/v1/score", {"text": "before the stop"})[0] == 200
    api.send_signal(signal.SIGTERM)
    assert api.wait(timeout_s=30) == 0
    assert "ESP API stopped" in api.log_path.read_text()  # type: ignore[union-attr]
