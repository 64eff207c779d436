"""The worker's HTTP endpoints: /metrics (Prometheus), /healthz (alive) and /readyz (able to score).

`/readyz` answers 503 with the reason while the model server is unreachable or its model is not
loaded, while pulling is paused for an outage, and while shutting down, so Kubernetes stops
routing and the autoscaler and the on-call engineer can see why. `/healthz` answers 503, with what
died, once a worker thread or the scoring engine has failed; the process then exits non-zero too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from esp.http_endpoint import HttpEndpoint, Reply, metrics_route, text_reply

log = logging.getLogger(__name__)


class HealthServer:
    """Serves the three endpoints on a background thread; `not_ready()` and `not_alive()` return None or the reason."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        not_ready: Callable[[], str | None],
        not_alive: Callable[[], str | None],
    ) -> None:
        def probe(path: str, check: Callable[[], str | None], ok: str) -> Callable[[str], Reply | None]:
            def route(requested: str) -> Reply | None:
                if requested != path:
                    return None
                reason = check()
                return text_reply(200, ok) if reason is None else text_reply(503, reason)

            return route

        self._endpoint = HttpEndpoint(
            "health and metrics",
            host,
            port,
            [
                metrics_route("/metrics", lambda: generate_latest(registry)),
                probe("/healthz", not_alive, "ok"),
                probe("/readyz", not_ready, "ready"),
            ],
            not_found="not found: try /metrics, /healthz, /readyz",
        )

    @property
    def port(self) -> int:
        return self._endpoint.port

    def start(self) -> HealthServer:
        self._endpoint.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)
        return self

    def stop(self) -> None:
        self._endpoint.stop()
