"""Runs the API: binds the port, builds the scorer and the shared engine, serves on uvicorn, drains.

Start-up failures (port taken, bad keys file, bad settings) are EspError/ConfigError: one line and
a non-zero exit from the CLI. On SIGTERM/SIGINT uvicorn stops accepting connections, /readyz turns
503, requests in flight finish within api_shutdown_grace_s, then the engine finishes its batches
and the process exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.app import ApiApp
from api.feedback import FeedbackPublisher
from api.keys import KeyStore
from api.metrics import ApiMetrics
from api.redact import install as install_redaction
from api.service import ScoringService
from esp.errors import ConfigError
from esp.logs import configure_logging
from esp.settings import (
    BatchingSettings,
    CommentSettings,
    LogSettings,
    ModelClientSettings,
    PubSubSettings,
)
from esp.settings.api import ApiSettings

log = logging.getLogger(__name__)

# The longest request head (request line and headers) served, bytes: a browser's is 1-2 KiB.
# httptools sets no limit and buffers a header line however long it grows, so without one a client
# could fill the pod's memory before any key is checked.
MAX_HEAD_BYTES = 64 * 1024


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything heavy starts: a taken port fails at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (set --api-port, or 0 for a free one)") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_app(
    engine: Any,
    *,
    service: ScoringService,
    settings: ApiSettings,
    comments: CommentSettings,
    pubsub: PubSubSettings | None,
    metrics: ApiMetrics,
) -> ApiApp:
    keys = None
    if settings.api_keys_file:
        keys = KeyStore(settings.api_keys_file, default_rate_per_s=settings.api_default_rate_per_s, default_burst=settings.api_default_burst)
        log.info("API keys required: %d keys loaded from %s", keys.count, settings.api_keys_file)
    else:
        log.warning("no API keys file (ESP_API_KEYS_FILE): anyone who reaches this port may score comments")
    service.attach(engine)
    feedback = FeedbackPublisher(pubsub, timeout_s=max(settings.api_request_deadline_s, 5.0)) if pubsub is not None else None
    return ApiApp(
        service=service,
        settings=settings,
        comment_settings=comments,
        metrics=metrics,
        keys=keys,
        feedback=feedback,
        not_ready=engine.not_ready,
        alive=engine.alive,
    )


def serve(
    settings: ApiSettings,
    *,
    batching: BatchingSettings,
    client: ModelClientSettings,
    comments: CommentSettings,
    pubsub: PubSubSettings | None,
    logs: LogSettings,
) -> int:
    """`esp api`: serves until SIGTERM/SIGINT; returns the exit code."""
    from esp.engine import ScoringEngine
    from serving.scorers import make_scorer

    configure_logging(logs)
    install_redaction(logging.getLogger().handlers)
    sock = bind(settings.api_host, settings.api_port)
    metrics = ApiMetrics()
    # The request deadline caps the client's own retries, and so does the engine's outage backoff:
    # a blip is absorbed inside one Predict, an outage reaches the engine (503 + Retry-After) in time.
    scorer = make_scorer(
        "tfserving", client, retry_budget_s=min(client.model_retry_budget_s, settings.api_request_deadline_s, batching.retry_max_backoff_s)
    )
    service = ScoringService(deadline_s=settings.api_request_deadline_s, unavailable_retry_after_s=batching.retry_max_backoff_s)
    engine = ScoringEngine(
        scorer,
        settings=batching,
        max_queued=settings.api_max_queued,
        registry=metrics.registry,
        probe=scorer.check_ready,  # type: ignore[attr-defined]
        on_batch=service.deliver,
    )
    app = None
    try:
        app = build_app(engine, service=service, settings=settings, comments=comments, pubsub=pubsub, metrics=metrics)
        engine.start()
        config = uvicorn.Config(
            app,
            loop="uvloop",
            http=bounded_httptools(MAX_HEAD_BYTES, head_timeout_s=settings.api_read_timeout_s),
            lifespan="off",
            # No websocket routes: an Upgrade is answered as the plain HTTP request it also is. With
            # uvicorn's websocket protocol on, a handshake carrying a body got no answer at all.
            ws="none",
            access_log=False,  # ours (api.access) redacts keys and counts comments
            proxy_headers=False,  # nothing reads the client's address; one middleware less per request
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=settings.api_shutdown_grace_s,
        )
        server = _Server(config, app)
        host, port = sock.getsockname()[:2]
        log.info("ESP API on http://%s:%d (page /, docs /docs, model server %s)", host, port, client.model_server)
        server.run(sockets=[sock])
    finally:
        engine.stop(grace_s=settings.api_shutdown_grace_s)
        if app is not None and app.feedback is not None:
            app.feedback.close()
        scorer.close()
        sock.close()
    log.info("ESP API stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's Server, with /readyz turning 503 as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, app: ApiApp) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app.shutting_down = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal once it has stopped, which would kill the process
        # before the engine drains; ESP finishes its batches and exits 0 by itself instead.
        self._captured_signals.clear()


# After an answer that leaves part of the request unread (413, 408, an early 401), the API keeps
# reading and dropping what the client still sends, for at most this long and this much, before it
# closes: closing with unread bytes makes the kernel reset the connection, and a client still
# sending its body would get a broken pipe instead of the answer (nginx's "lingering close").
LINGER_S = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024


class _Refused(httptools.HttpParserCallbackError):
    """Raised from a parser callback to stop parsing a request the protocol refuses (431, 400)."""


def bounded_httptools(max_head_bytes: int, *, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with every connection bounded in size and in time.

    - A request head over `max_head_bytes` is answered 431 and the connection closed, whether it
      arrives in one read or in many.
    - A head still incomplete `head_timeout_s` after its first byte (or after the connection
      opened, or after the first byte following an answer) closes the connection: a client
      trickling headers, or blank lines or the rest of a body after its answer, holds nothing for
      long. The clock starts only once the requests before it are answered. An idle connection is
      uvicorn's keep-alive timeout's.
    - A client whose answers stop draining for `head_timeout_s` is dropped, so the answers waiting
      for it do not hold memory for as long as it likes.
    - After an answer that leaves the request's body unread, the connection lingers (LINGER_S).
    - A request the parser refuses (400, 431) is answered after the requests before it, in order;
      a request whose own body is malformed gets the 400 instead of its answer.
    - An Upgrade (websockets are off, ws="none") is ignored, as RFC 9110 7.8 lets a server do, and
      the request's body read as HTTP/1.1: llhttp stops at the head of an upgrade request, and
      uvicorn would answer it without its body.
    """

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = False
        # Two lower bounds of the head's size, either of which over the limit refuses it: the lines
        # the parser completed (a head whole in one read), and the reads that were head throughout.
        _head_lines = 0
        _head_raw = 0
        _began = False  # a message began during the read being parsed
        _head_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None
        _write_backlog = 0
        _linger_timer: asyncio.TimerHandle | None = None
        _linger_left = 0
        _refusal: bytes | None = None  # the answer to a refused request, set once parsing stopped
        _held: bytes | None = None  # a refusal waiting for the answers of the requests before it
        _raw_body_left = 0  # bytes of an upgrade request's body still to come (_upgrade_ignored)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop, linger=self._linger))  # type: ignore[arg-type]
            self._head_started()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._head_timer, self._write_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._write_timer = self._linger_timer = None
            self._in_head = False
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]  # the head and body in one write
            if self._linger_timer is not None:  # closing: no queued request starts now
                return
            super().on_response_complete()
            if self._answered_all():
                if self._held is not None:
                    answer, self._held = self._held, None
                    self._refuse(answer)
                elif self._in_head and self._head_timer is None:
                    self._arm_head_timer()  # its turn has come: its clock starts

        # -- parsing

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._began = True
            self._head_started()

        def on_url(self, url: bytes) -> None:
            self._count_line(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_line(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._head_done()
            if self.parser.should_upgrade() and any(name.lower() == b"transfer-encoding" for name, _ in self.headers):
                # An upgrade request's body is read by hand (_upgrade_ignored), by its length only.
                raise _Refused("an Upgrade request with a chunked body")
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            while data:
                if self._linger_timer is not None:  # answered and closing: what still comes is dropped
                    self._linger_left -= len(data)
                    if self._linger_left < 0:
                        self._end_linger()
                    return
                if self._refusal is not None or self._held is not None:  # parsing stopped for good
                    return
                if self._raw_body_left:
                    data = self._raw_body(data)
                    continue
                data = self._parse(data)

        def _parse(self, data: bytes) -> bytes:
            """Feeds the parser; returns what follows an upgrade request's head (b"" otherwise)."""
            was_in_head = self._in_head
            self._began = False
            self._unset_keepalive_if_required()
            rest = b""
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = self._upgrade_ignored(data[exc.args[0] if exc.args else len(data) :])
            except httptools.HttpParserError:
                if self._refusal is None:
                    self.logger.warning("Invalid HTTP request received.")
                self._answer_refusal()
                return b""
            if self._in_head and was_in_head and not self._began:  # this whole read was head
                self._head_raw += len(data)
                if self._head_raw > max_head_bytes:
                    self._refusal = self._head_too_large()
                    self._answer_refusal()
                    return b""
            if not self._in_head and self._head_timer is None and self._answered_all():
                # Bytes after an answer that start no request (blank lines, or the rest of a body
                # the answer did not need): the next head must still come within the timeout.
                self._arm_head_timer()
            return rest

        def _count_line(self, n: int) -> None:
            self._head_lines += n
            if self._head_lines > max_head_bytes:
                self._refusal = self._head_too_large()
                raise _Refused(f"request head over {max_head_bytes} bytes")

        def _head_too_large(self) -> bytes:
            log.warning("a request head over %d bytes from %s: answered 431", max_head_bytes, self.client[0] if self.client else "?")
            return _plain_answer(431, "Request Header Fields Too Large", f"request head over {max_head_bytes} bytes\n")

        # -- refusals, in order

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own callers (none left but this protocol's) go through the ordering below.
            self._refusal = self._refusal or _plain_answer(400, "Bad Request", msg)
            self._answer_refusal()

        def _answer_refusal(self) -> None:
            """Answers the request the parser stopped on (self._refusal), after the ones before it."""
            answer = self._refusal or _plain_answer(400, "Bad Request", "Invalid HTTP request received.")
            self._refusal = answer
            self._head_done()
            cycle = self.cycle
            if cycle is not None and cycle.more_body:  # the parser stopped inside this request's own body
                queued = [entry for entry in self.pipeline if entry[0] is cycle]
                if queued:
                    self.pipeline.remove(queued[0])  # never started: its refusal replaces its answer
                elif cycle.response_started:
                    self.transport.close()  # it is being answered: an answer cannot be taken back
                    return
                else:
                    cycle.disconnected = True  # its application sees a disconnect; its answer is dropped
                    cycle.message_event.set()
                    cycle.response_complete = True
            if self._answered_all():
                self._refuse(answer)
            else:
                self._held = answer
                self.flow.pause_reading()

        def _refuse(self, answer: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

        def _answered_all(self) -> bool:
            return not self.pipeline and (self.cycle is None or self.cycle.response_complete)

        # -- upgrades

        def _upgrade_ignored(self, rest: bytes) -> bytes:
            """The parser stopped after an upgrade request's head; `rest` is what followed it.
            Returns what follows the request's body, for a fresh parser."""
            cycle = self.cycle
            length = next((value for name, value in self.headers if name == b"content-length"), b"0")
            self.parser = httptools.HttpRequestParser(self)  # for the requests after this one
            if cycle is None or not length.isdigit():
                if cycle is not None:
                    cycle.more_body = True  # the refusal is this request's answer, not one more
                self._answer_refusal()
                return b""
            self._raw_body_left = int(length)
            if self._raw_body_left:
                cycle.more_body = True  # llhttp said the message was complete at its head
                return self._raw_body(rest)
            return rest

        def _raw_body(self, data: bytes) -> bytes:
            """Hands the body of an upgrade request to its cycle; returns what follows the body."""
            cycle = self.cycle
            take = data[: self._raw_body_left]
            self._raw_body_left -= len(take)
            if cycle is not None and not cycle.response_complete:
                cycle.body += take
                if not self._raw_body_left:
                    cycle.more_body = False
                cycle.message_event.set()
            return data[len(take) :]

        # -- timers

        def _head_started(self) -> None:
            self._in_head = True
            self._head_lines = self._head_raw = 0
            if self._head_timer is None and self._answered_all():
                self._arm_head_timer()

        def _head_done(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)

        def _head_too_slow(self) -> None:
            # Armed only while no request is being answered; cancelled as soon as a head is complete.
            self._head_timer = None
            self._in_head = False
            if not self.transport.is_closing():
                self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_backlog = self.transport.get_write_buffer_size()
                self._write_timer = self.loop.call_later(head_timeout_s, self._not_reading)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _not_reading(self) -> None:
            self._write_timer = None
            if self.transport.is_closing():
                return
            backlog = self.transport.get_write_buffer_size()
            if backlog < self._write_backlog:  # a slow reader, but a reader: another period
                self._write_backlog = backlog
                self._write_timer = self.loop.call_later(head_timeout_s, self._not_reading)
                return
            log.info("a client of %s read nothing for %.0fs: connection dropped", self.client[0] if self.client else "?", head_timeout_s)
            self.transport.abort()

        # -- lingering close

        def _linger(self) -> bool:
            """Called as the transport closes: True when the connection lingers (and closes itself later)."""
            if self._linger_timer is not None or self.cycle is None or not self.cycle.more_body or self.pipeline:
                return False
            self._linger_left = LINGER_MAX_BYTES
            self._linger_timer = self.loop.call_later(LINGER_S, self._end_linger)
            self.flow.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the answer is whole: the client sees it end
            return True

        def _end_linger(self) -> None:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            self.transport.close()  # the linger hook declines now: the timer handle is still set

    return BoundedHttpToolsProtocol


def _plain_answer(status: int, phrase: str, message: str) -> bytes:
    body = message.encode("ascii", "replace")
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class CoalescingTransport:
    """A socket transport that sends a response's head and body in one write.

    uvicorn writes the status line and headers, then the body, each straight to the socket: two
    system calls and two TCP segments per answer, and the client woken twice. Here writes wait
    until the response is complete (the protocol flushes then) or, for anything else (a 100
    Continue, a streamed body, a 431), until the end of the event loop's current iteration.
    Everything but writing is the socket transport's own.
    """

    __slots__ = ("_buffer", "_eof", "_flush_scheduled", "_linger", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, *, linger: Callable[[], bool] | None = None) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._linger = linger  # asked on close(): True when the protocol closes later itself
        self._eof = False  # write_eof() was called: nothing more may be written

    def write(self, data: bytes) -> None:
        if self._eof:
            return  # the connection is lingering after its last answer: a late write goes nowhere
        self._buffer.append(bytes(data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if self._buffer:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    def close(self) -> None:
        self.flush()
        if self._linger is not None and not self._transport.is_closing() and self._linger():
            return
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._eof = True
        self._transport.write_eof()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    # Called on every request: named here rather than found through __getattr__.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
