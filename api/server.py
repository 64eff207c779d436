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
from typing import Any

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
from esp.settings import BatchingSettings, CommentSettings, LogSettings, ModelClientSettings, PubSubSettings
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


def bounded_httptools(max_head_bytes: int, *, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with the request head bounded in size and in time.

    A head over `max_head_bytes` is answered 431 and the connection closed; a head still
    incomplete `head_timeout_s` after its first byte (or after the connection opened) closes the
    connection: a client trickling headers holds nothing for long. Between requests uvicorn's own
    keep-alive timeout applies.
    """

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes: int | None = None  # bytes of the request head so far; None between heads
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
            self._head_started()

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]  # the head and body in one write
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_done()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_bytes is None:
                self._head_started()

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            in_head = self._head_bytes is not None
            super().data_received(data)
            if in_head and self._head_bytes is not None:  # this whole chunk was head
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self._refuse_head()

        def _head_started(self) -> None:
            self._head_bytes = 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)

        def _head_done(self) -> None:
            self._head_bytes = None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._head_bytes is not None and not self.transport.is_closing():
                self._head_bytes = None
                self.transport.close()

        def _refuse_head(self) -> None:
            self._head_done()
            if self.transport.is_closing():
                return
            log.warning("a request head over %d bytes from %s: answered 431", max_head_bytes, self.client[0] if self.client else "?")
            message = f"request head over {max_head_bytes} bytes\n".encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: " + str(len(message)).encode() + b"\r\nconnection: close\r\n\r\n" + message
            )
            self.transport.close()

    return BoundedHttpToolsProtocol


class CoalescingTransport:
    """A socket transport that sends a response's head and body in one write.

    uvicorn writes the status line and headers, then the body, each straight to the socket: two
    system calls and two TCP segments per answer, and the client woken twice. Here writes wait
    until the response is complete (the protocol flushes then) or, for anything else (a 100
    Continue, a streamed body, a 431), until the end of the event loop's current iteration.
    Everything but writing is the socket transport's own.
    """

    __slots__ = ("_buffer", "_flush_scheduled", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes) -> None:
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
        self._transport.close()

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
