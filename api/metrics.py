"""The HTTP API's Prometheus metrics, in the same registry as the engine's (esp_batch_size, ...).

Label children are created once and cached: a `labels()` lookup per request is measurable against a
0.4 ms CPU budget.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENDPOINTS = ("score", "analyze", "suggestscore", "page", "docs", "health", "metrics", "other")
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("esp_api_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "code"], registry=r)
        self.latency = Histogram(
            "esp_api_request_latency_seconds", "Time from request to answer, by endpoint.", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.comments = Counter("esp_api_comments", "Comments scored through the API (spans included), by endpoint.", ["endpoint"], registry=r)
        self.errors = Counter("esp_api_errors", "Requests answered with an error, by ESP's reason.", ["reason"], registry=r)
        self.in_flight = Gauge("esp_api_requests_in_flight", "Requests being handled now.", registry=r)
        self.ready = Gauge("esp_api_ready", "1 while /readyz answers 200.", registry=r)
        self._latency = {e: self.latency.labels(e) for e in ENDPOINTS}
        self._comments = {e: self.comments.labels(e) for e in ENDPOINTS}
        self._requests: dict[tuple[str, int], object] = {}

    def answered(self, endpoint: str, code: int, seconds: float) -> None:
        child = self._requests.get((endpoint, code))
        if child is None:
            child = self._requests[(endpoint, code)] = self.requests.labels(endpoint, str(code))
        child.inc()  # type: ignore[attr-defined]
        self._latency[endpoint].observe(seconds)

    def scored(self, endpoint: str, count: int) -> None:
        self._comments[endpoint].inc(count)
