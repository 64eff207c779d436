"""A small HTTP endpoint for probes and scrapes: one port, GET only, answered by routes.

The worker (/metrics, /healthz, /readyz) and `esp serve` (TF Serving's REST status and its
Prometheus page) both serve through it, so binding, error handling and quiet access logs are one
piece of code. A route takes the path and returns a Reply, or None to let the next route try; no
route answering is a 404. Binding happens in the constructor, so a port in use is a one-line
ConfigError at start-up, never a traceback. A route that raises answers 500 and is logged; the
endpoint stays up. The serving thread is the owner's to supervise (`thread`).

Anything in the namespace can reach this port (a scraper gone wrong, a port scan, a hostile pod),
and a probe that cannot get through restarts a healthy pod. So what a client can hold is bounded,
whatever it does: connections are served by one asyncio thread (an idle socket costs a file
descriptor and a few KiB, never a thread), routes run on a fixed pool of `route_threads`; a
request head must arrive whole within `request_timeout_s` and fit in MAX_HEAD_BYTES; beyond
`max_connections`, the connection that has waited longest without sending its request is closed
to make room, so a flood of idle sockets cannot starve the probes (they send their request at once).
One request per connection (`Connection: close`), as probes and Prometheus use it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus

from esp.errors import ConfigError

log = logging.getLogger(__name__)

# What a route answers: HTTP status, content type, body.
Reply = tuple[int, str, bytes]
Route = Callable[[str], "Reply | None"]
TEXT = "text/plain; charset=utf-8"

# A probe's or a scrape's request head is a few hundred bytes; 16 KiB leaves room for any proxy's headers.
MAX_HEAD_BYTES = 16 * 1024
# Kubernetes probes time out after 1 s by default: a head still incomplete after 5 s is no probe.
REQUEST_TIMEOUT_S = 5.0
# Connections open at once; the ones waiting longest for a request head make room for new ones.
MAX_CONNECTIONS = 256
# Routes answer from memory (metrics, health flags, model status): a few threads suffice, and
# bound what slow routes can pile up.
ROUTE_THREADS = 4
# How long an answer may take to drain to a client that stopped reading.
WRITE_TIMEOUT_S = 5.0


def text_reply(code: int, text: str) -> Reply:
    # "replace": a reason may quote input holding a lone surrogate; the body must still be UTF-8.
    return code, TEXT, text.encode("utf-8", "replace") + b"\n"


def metrics_route(path: str, page: Callable[[], bytes]) -> Route:
    """Serves Prometheus's text format at exactly `path`."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def route(requested: str) -> Reply | None:
        return (200, CONTENT_TYPE_LATEST, page()) if requested == path else None

    return route


class HttpEndpoint:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        routes: list[Route],
        *,
        not_found: str = "",
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        route_threads: int = ROUTE_THREADS,
    ) -> None:
        self.name = name
        self._routes = routes
        self._not_found = not_found
        self._max_connections = max_connections
        self._request_timeout_s = request_timeout_s
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for the {name}: {exc.strerror or exc}") from None
        self._pool = concurrent.futures.ThreadPoolExecutor(route_threads, thread_name_prefix=f"esp-http-{name}")
        # Connections still waiting for their request head, oldest first (the ones to close for room).
        self._waiting: collections.OrderedDict[asyncio.StreamWriter, None] = collections.OrderedDict()
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"esp-http-{name}", daemon=True)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def answer(self, path: str) -> Reply:
        for route in self._routes:
            reply = route(path)
            if reply is not None:
                return reply
        return text_reply(404, self._not_found) if self._not_found else (404, TEXT, b"")

    def start(self) -> HttpEndpoint:
        self.thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and self.thread.is_alive():
            try:
                loop.call_soon_threadsafe(stopped.set)
            except RuntimeError:  # the loop already closed
                pass
            self.thread.join(10)
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ serving

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._sock, limit=MAX_HEAD_BYTES)
        self._ready.set()
        await self._stopped.wait()
        server.close()
        for writer in list(self._waiting):
            writer.transport.abort()
        # asyncio.run cancels the connections still answering.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self._waiting[writer] = None
        try:
            if self._open > self._max_connections:
                self._make_room()
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away, sent half a request, or stopped reading: nothing to answer
        finally:
            self._open -= 1
            self._waiting.pop(writer, None)
            writer.close()

    def _make_room(self) -> None:
        """Closes the connection that has waited longest for its request head (possibly the newest)."""
        oldest = next(iter(self._waiting))
        self._waiting.pop(oldest)
        oldest.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._request_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, TEXT, b"request header fields too large\n", head_only=False)
            return
        except TimeoutError:
            if not writer.is_closing():
                await self._send(writer, 408, TEXT, b"the request did not arrive in time\n", head_only=False)
            return
        self._waiting.pop(writer, None)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._send(writer, 400, TEXT, b"malformed request line\n", head_only=False)
            return
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, TEXT, b"only GET is served here\n", head_only=False, extra=b"Allow: GET, HEAD\r\n")
            return
        path = urllib.parse.urlsplit(target).path
        try:
            code, content_type, body = await asyncio.get_running_loop().run_in_executor(self._pool, self.answer, path)
        except Exception:  # a bug in a route answers 500 and is logged; the endpoint stays up
            log.exception("%s: GET %s failed", self.name, path[:200])
            code, content_type, body = 500, "application/json", json.dumps({"error": "internal error (see the log)"}).encode()
        await self._send(writer, code, content_type, body, head_only=method == "HEAD")

    async def _send(
        self, writer: asyncio.StreamWriter, code: int, content_type: str, body: bytes, *, head_only: bool, extra: bytes = b""
    ) -> None:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:  # a code HTTP does not name (TF Serving's 499)
            phrase = ""
        writer.write(
            f"HTTP/1.1 {code} {phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n".encode("latin-1")
            + extra
            + b"\r\n"
            + (b"" if head_only else body)
        )
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()
