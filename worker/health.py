"""The worker's HTTP endpoints: /metrics (Prometheus), /healthz (alive) and /readyz (able to score).

`/readyz` answers 503 with the reason while the model server is unreachable or its model is not
loaded, while pulling is paused for an outage, and while shutting down, so Kubernetes stops
routing and the autoscaler and the on-call engineer can see why. `/healthz` answers 503, with what
died, once a worker thread or the scoring engine has failed; the process then exits non-zero too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from esp.errors import EspError

log = logging.getLogger(__name__)


class HealthServer:
    """Serves the three endpoints on a background thread; `not_ready()` returns None or the reason."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        alive: Callable[[], bool],
        not_ready: Callable[[], str | None],
        not_alive: Callable[[], str | None] | None = None,
    ) -> None:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server_self.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    dead = server_self.not_alive() if server_self.not_alive else (None if server_self.alive() else "worker threads stopped")
                    self._send(200 if dead is None else 503, b"ok\n" if dead is None else dead.encode("utf-8", "replace") + b"\n")
                elif path == "/readyz":
                    reason = server_self.not_ready()
                    self._send(200 if reason is None else 503, b"ready\n" if reason is None else reason.encode("utf-8", "replace") + b"\n")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz\n")

            def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                # Probes hit these every few seconds; their access log is noise.
                pass

        self.registry = registry
        self.alive = alive
        self.not_ready = not_ready
        self.not_alive = not_alive
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise EspError(f"cannot serve health and metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="esp-health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
