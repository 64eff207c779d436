"""Hostile HTTP against a real `esp api` (in front of a real `esp serve`): each test is one
reproduction of a way a client breaks the API's contract (docs/api.md: every bad request gets a
status and a reason, never a bare 500, never a hang, no connection held without bound).

Raw sockets throughout: these are requests an HTTP library would not send, or sends in a way that
hides what the server did.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
from pathlib import Path

import pytest

from api.keys import hash_key, new_key
from api.local import ApiProcess
from esp.localstack import wait_until
from esp.settings.api import ApiSettings

ANALYZE = "/v1alpha1/comments:analyze"
SUGGEST = "/v1alpha1/comments:suggestscore"


def _post(port: int, path: str, body: bytes, extra_headers: bytes = b"", timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One POST over a raw socket, `Connection: close`; (status, headers, body)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n".encode()
        + extra_headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def _closed_by_server_within(sock: socket.socket, seconds: float, *, keep_sending: bytes = b"", every_s: float = 0.5) -> float | None:
    """Seconds until the server closed `sock` (EOF, reset or a failed send), or None if it was still
    open after `seconds`. Anything the server sends meanwhile is read and dropped; `keep_sending` is
    sent every `every_s`."""
    sock.settimeout(every_s)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if keep_sending:
                sock.sendall(keep_sending)
            data = sock.recv(65536)
            if data == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------------------------
# A bare 500


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # An attribute name that is a lone surrogate (valid JSON: a \ud800 escape in an object key).
        (ANALYZE, rb'{"comment": {"text": "hi"}, "requestedAttributes": {"\ud800": {}}}'),
        # An unknown top-level field so named.
        (ANALYZE, rb'{"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "\ud800": 1}'),
        # An unknown field inside comment.
        (ANALYZE, rb'{"comment": {"text": "hi", "\udfff": 1}, "requestedAttributes": {"TOXICITY": {}}}'),
        # A suggested attribute so named.
        (SUGGEST, rb'{"comment": {"text": "hi"}, "attributeScores": {"\ud800": {"summaryScore": {"value": 0.5}}}}'),
    ],
    ids=["analyze-attribute", "analyze-field", "analyze-comment-field", "suggest-attribute"],
)
def test_a_lone_surrogate_in_a_field_name_gets_a_400_not_a_bare_500(shared_api: ApiProcess, path: str, body: bytes) -> None:
    """The Perspective parser puts the client's field name into its error message; a name that is a
    lone surrogate cannot be encoded by orjson, the error answer itself raises, and uvicorn answers
    a bare text/plain 500 "Internal Server Error" with a traceback in the log (no reason, no
    incident id, no access-log line)."""
    status, headers, payload = _post(shared_api.port, path, body)
    assert status == 400, (status, headers.get("content-type"), payload[:200])
    assert headers["content-type"] == "application/json"
    assert json.loads(payload)["error"]["details"][0]["errorType"] == "INVALID_REQUEST"


# ---------------------------------------------------------------------------------------------
# A valid request misread


def test_a_post_with_an_h2c_upgrade_header_is_scored_not_refused_as_empty(shared_api: ApiProcess) -> None:
    """`curl --http2 -d '{"text": ...}' http://.../v1/score` (Debian's curl 7.88) sends
    `Connection: Upgrade, HTTP2-Settings` and `Upgrade: h2c` with its POST. The server may ignore the
    Upgrade (RFC 9110 7.8) but must read the body: httptools stops at the head of an upgrade
    request, uvicorn goes on as HTTP/1.1 without the body, and the API answers 400 invalid_json
    "the request body is empty" to a request whose body was sent."""
    status, _, payload = _post(
        shared_api.port, "/v1/score", b'{"text": "a perfectly normal comment"}',
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
    )
    assert status == 200, (status, payload[:300])
    assert set(json.loads(payload)["scores"])


# ---------------------------------------------------------------------------------------------
# Connections held without bound


def test_a_websocket_upgrade_with_a_body_is_answered_or_closed(start_api) -> None:
    """The API has no WebSocket route, but uvicorn's WebSocket protocol is on (ws="auto"). A
    handshake that carries a body (`Content-Length: 1`) makes the websockets parser fail without
    an event; nothing is written and no timer is left: the connection gets no answer and is held
    open for ever (a slowloris needing one write per connection: 2,000 such connections were all
    still open 15 s later, past the 3 s head timeout)."""
    api = start_api(ApiSettings(api_read_timeout_s=1.0))
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 1\r\n\r\nx"
    )
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(request)
        sock.settimeout(8.0)  # the read timeout is 1 s, uvicorn's keep-alive 5 s
        try:
            answer = sock.recv(1000)
        except TimeoutError:
            answer = None
    assert answer is not None, "no answer and the connection still open 8 s after a one-write request"
    # No websocket routes: the Upgrade is ignored (RFC 9110 7.8) and the request answered as HTTP.
    assert answer == b"" or (answer.startswith(b"HTTP/1.1 ") and not answer.startswith(b"HTTP/1.1 101")), answer


@pytest.mark.parametrize(
    ("opening", "trickle"),
    [
        # A keep-alive answer, then an empty line every 0.5 s (llhttp skips CRLFs between
        # requests without starting a message, so no head timer starts).
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"\r\n"),
        # A request the API answers without reading its body (here /healthz; also a 401, 403 or
        # 415 on the scoring endpoints), then that body one byte every 0.5 s.
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n", b"a"),
    ],
    ids=["crlf-after-answer", "body-after-early-answer"],
)
def test_bytes_trickled_after_an_answer_do_not_hold_the_connection_for_ever(start_api, opening: bytes, trickle: bytes) -> None:
    """Once an answer is sent, only uvicorn's keep-alive timer (5 s) guards the connection, and any
    byte received cancels it for good; the API's head timer starts only with a new message. So a
    client that sends a byte every few seconds holds the connection (and a file descriptor) for
    ever: no read timeout, no keep-alive timeout, no limit on connections."""
    api = start_api(ApiSettings(api_read_timeout_s=1.0))
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(opening)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200 and response.read() == b"ok\n"
        closed_after = _closed_by_server_within(sock, 12.0, keep_sending=trickle)
    assert closed_after is not None, "the connection was still open 12 s after its answer (read timeout 1 s, keep-alive 5 s)"


def test_clients_that_stop_reading_do_not_pin_the_apis_memory(start_api) -> None:
    """A client that pipelines requests for a large asset (the 1 MiB Swagger UI bundle) and never
    reads: once the kernel's buffers are full, the next answer waits whole in the transport's
    buffer, and the request task waits in uvicorn's drain() with no timeout. Each such connection
    pins about 1 MiB of the API's memory for as long as the client likes; the pod's limit is
    512 MiB (k8s/base/api-deployment.yaml says memory is bounded whatever the load)."""
    api = start_api(ApiSettings(api_read_timeout_s=1.0))
    clients = 60
    before = _rss_mib(api.pid)
    fds_before = len(os.listdir(f"/proc/{api.pid}/fd"))
    socks = []
    try:
        for _ in range(clients):
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /docs/swagger-ui-bundle.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 12)
            socks.append(sock)
        def held() -> int:
            return len(os.listdir(f"/proc/{api.pid}/fd")) - fds_before

        # 15 times the read timeout, 3 times uvicorn's keep-alive.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: held() < clients // 2, timeout_s=15.0, what="the API to drop the clients that stopped reading")
        grown = _rss_mib(api.pid) - before
        still_held = held()
    finally:
        for sock in socks:
            sock.close()
    assert grown < 24 and still_held < clients // 2, (
        f"15 s after {clients} clients stopped reading, the API still holds {still_held} of their connections "
        f"and {grown:.0f} MiB more memory"
    )


# ---------------------------------------------------------------------------------------------
# An answer that never reaches the client


def test_an_ordinary_client_sending_a_too_large_body_receives_the_413(start_api) -> None:
    """docs/api.md: a body over --api-max-body-bytes is answered 413 body_too_large, "refused from
    Content-Length, unread". The API answers and closes at once, with the client still sending: the
    unread bytes make the kernel reset the connection, and a client sending the body the ordinary
    way (http.client, as urllib and requests do) gets a broken pipe or a reset, never the 413
    (10 tries out of 10 with 16 MiB over the 1 MiB default)."""
    api = start_api(ApiSettings(api_max_body_bytes=4096, api_max_text_bytes=200))
    body = b'{"text": "' + b"a" * (16 << 20) + b'"}'
    outcomes = []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=20)
        try:
            conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            outcomes.append(response.status)
            response.read()
        except OSError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
    assert outcomes == [413] * 3, outcomes


# ---------------------------------------------------------------------------------------------
# Keys


def test_an_empty_key_header_does_not_hide_a_valid_query_key(start_api, tmp_path: Path) -> None:
    """A valid `?key=` with an empty `X-Goog-Api-Key:` header (a client that always sets the header
    from a config value that is empty) is answered 401 missing_api_key, "pass ?key=KEY or the
    X-Goog-Api-Key header", though the request did pass ?key=: an empty header counts as given."""
    key = new_key()
    keys = tmp_path / "keys"
    keys.write_text(f"tool {hash_key(key)} 100 100\n")
    api = start_api(ApiSettings(api_keys_file=str(keys)))
    body = b'{"text": "hello"}'
    assert _post(api.port, f"/v1/score?key={key}", body)[0] == 200
    status, _, payload = _post(api.port, f"/v1/score?key={key}", body, b"X-Goog-Api-Key: \r\n")
    assert status == 200, (status, payload[:300])


# ---------------------------------------------------------------------------------------------
# The request head limit, and pipelining


def test_a_request_head_over_64_kib_is_refused_even_when_it_arrives_in_one_read(shared_api: ApiProcess) -> None:
    """docs/api.md: "the HTTP layer refuses a request head (request line and headers) over 64 KiB
    with 431". The count is only kept for reads that end with the head still incomplete: a head
    that arrives whole in one read (here a 100 KB header line in one write, on loopback) is never
    counted and is served, 200."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Filler: " + b"a" * 100_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=10) as sock:
        sock.sendall(head)
        answer = sock.recv(100)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_a_malformed_pipelined_request_does_not_take_the_answer_of_the_one_before(shared_api: ApiProcess) -> None:
    """Two pipelined requests: a valid POST /v1/score, then a malformed one (a space before a
    header's colon). The parser error on the second is answered at once, 400 "Invalid HTTP request
    received.", and the connection closed while the first is being scored: the first request's
    answer is never sent, and the client reads the 400 as the answer to its valid POST."""
    first = b'POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"text": "fine"}'
    second = b"GET /healthz HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=10) as sock:
        sock.sendall(first + second)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes, after the 400
            received += chunk
    # The scored answer first, then the malformed request's own 400, then the close.
    one, _, two = received.partition(b"HTTP/1.1 400 ")
    assert one.startswith(b"HTTP/1.1 200 ") and b'"scores"' in one, received[:300]
    assert two.endswith(b"Invalid HTTP request received."), received[-300:]


# ---------------------------------------------------------------------------------------------
# Found in review of the bounds above


def _exchange(port: int, *parts: bytes | float, read_s: float = 10.0) -> bytes:
    """Sends `parts` (a float is a pause, seconds) and reads until the server closes or `read_s` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as sock:
        for part in parts:
            if isinstance(part, float):
                time.sleep(part)
            else:
                sock.sendall(part)
        received = b""
        deadline = time.monotonic() + read_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        return received


def _close(request: bytes) -> bytes:
    return request.replace(b"Host: 1\r\n", b"Host: 1\r\nConnection: close\r\n", 1)


def test_a_40_kib_head_in_two_reads_is_served(shared_api: ApiProcess) -> None:
    """A head under 64 KiB is served however it is cut into reads (each byte counted once)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 1\r\nConnection: close\r\n" + b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
    received = _exchange(shared_api.port, head, 0.3, b"\r\n")
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]


def test_an_oversized_head_pipelined_after_a_valid_request_waits_for_its_answer(shared_api: ApiProcess) -> None:
    valid = b"GET /healthz HTTP/1.1\r\nHost: 1\r\n\r\n"
    huge = b"GET /healthz HTTP/1.1\r\nHost: 1\r\nX-Filler: " + b"a" * 70_000 + b"\r\n\r\n"
    received = _exchange(shared_api.port, valid + huge)
    assert received.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 431 " in received, received[:300]
    assert received.count(b"HTTP/1.1 ") == 2


@pytest.mark.parametrize("path", [b"/v1/score", b"/healthz"])
def test_a_malformed_chunked_body_gets_one_400_at_once(shared_api: ApiProcess, path: bytes) -> None:
    """The parser stops inside the request's own body: the 400 is that request's one answer,
    at once (not a 408 after the read timeout, not its answer and then a 400)."""
    request = b"POST " + path + b" HTTP/1.1\r\nHost: 1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    started = time.monotonic()
    received = _exchange(shared_api.port, request)
    assert received.startswith(b"HTTP/1.1 400 ") and received.count(b"HTTP/1.1 ") == 1, received[:300]
    assert time.monotonic() - started < 2.0


def test_hundreds_of_pipelined_upgrade_requests_are_all_answered(shared_api: ApiProcess) -> None:
    """Each ignored Upgrade hands what follows it to a fresh parser, in a loop (once a recursion)."""
    one = b"GET /healthz HTTP/1.1\r\nHost: 1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    received = _exchange(shared_api.port, one * 399 + _close(one))
    assert received.count(b"HTTP/1.1 200 ") == 400


def test_a_413_with_a_request_pipelined_behind_it_logs_no_error(start_api, tmp_path: Path) -> None:
    """The 413 closes the connection; the request behind it is never started (nothing is written
    after the lingering close's end-of-stream, which once raised inside the application)."""
    api = start_api(ApiSettings(api_max_body_bytes=4096, api_max_text_bytes=200))
    big = b"POST /v1/score HTTP/1.1\r\nHost: 1\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    after = b"GET /healthz HTTP/1.1\r\nHost: 1\r\nContent-Length: 100\r\n\r\nabc"
    received = _exchange(api.port, big + after)
    assert received.startswith(b"HTTP/1.1 413 ") and received.count(b"HTTP/1.1 ") == 1, received[:300]
    assert api.log_path is not None
    assert "Exception in ASGI" not in api.log_path.read_text(errors="replace")
