"""A small HTTP endpoint for probes and scrapes: one port, GET only, answered by routes.

The worker (/metrics, /healthz, /readyz) and `esp serve` (TF Serving's REST status and its
Prometheus page) both serve through it, so binding, error handling and quiet access logs are one
piece of code. A route takes the path and returns a Reply, or None to let the next route try; no
route answering is a 404. Binding happens in the constructor, so a port in use is a one-line
ConfigError at start-up, never a traceback. A route that raises answers 500 and is logged; the
endpoint stays up. The serving thread is the owner's to supervise (`thread`).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from esp.errors import ConfigError

log = logging.getLogger(__name__)

# What a route answers: HTTP status, content type, body.
Reply = tuple[int, str, bytes]
Route = Callable[[str], "Reply | None"]
TEXT = "text/plain; charset=utf-8"


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
    def __init__(self, name: str, host: str, port: int, routes: list[Route], *, not_found: str = "") -> None:
        self.name = name
        self._routes = routes
        self._not_found = not_found
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = urllib.parse.urlsplit(self.path).path
                try:
                    code, content_type, body = endpoint.answer(path)
                except Exception:  # a bug in a route answers 500 and is logged; the endpoint stays up
                    log.exception("%s: GET %s failed", endpoint.name, path)
                    code, content_type, body = 500, "application/json", json.dumps({"error": "internal error (see the log)"}).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                # Probes and scrapes call every few seconds; their access log is noise.
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for the {name}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self.thread = threading.Thread(target=self._server.serve_forever, name=f"esp-http-{name}", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def answer(self, path: str) -> Reply:
        for route in self._routes:
            reply = route(path)
            if reply is not None:
                return reply
        return text_reply(404, self._not_found) if self._not_found else (404, TEXT, b"")

    def start(self) -> HttpEndpoint:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
