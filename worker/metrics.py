"""The worker's Prometheus metrics, counted where the thing happens (STYLE.md point 10).

Each Worker owns its own registry, so several workers can run in one process (the tests do) and
`/metrics` shows exactly one worker's numbers. Batching and model metrics (esp_batch_size,
esp_batch_latency_seconds, esp_model_outage, ...) are the scoring engine's, in the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esp.engine import LATENCY_BUCKETS_S
from esp.outages import CAUSES

# Outcomes of a pulled message (the `outcome` label of esp_messages_total).
SCORED = "scored"  # score published and confirmed, message acked
DEAD_LETTERED = "dead_lettered"  # dead letter published and confirmed, message acked
NACKED_REJECTED = "nacked_rejected"  # the model refused it; redelivered (spends one attempt)
NACKED_SHUTDOWN = "nacked_shutdown"  # handed back on shutdown
NACKED_PUBLISH_FAILED = "nacked_publish_failed"  # Pub/Sub refused even its dead letter (never expected)
OUTCOMES = (SCORED, DEAD_LETTERED, NACKED_REJECTED, NACKED_SHUTDOWN, NACKED_PUBLISH_FAILED)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter("esp_messages", "Pulled comments by final outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        self.pulled = Counter("esp_pulled_messages", "Messages received from Pull.", registry=r)
        self.end_to_end_latency = Histogram(
            "esp_end_to_end_latency_seconds",
            "From the comment's Pub/Sub publish time to its score's confirmed publish.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge("esp_in_flight_messages", "Messages held: pulled, not yet acked or nacked.", registry=r)
        self.in_flight_bytes = Gauge("esp_in_flight_bytes", "Body bytes of the messages held.", registry=r)
        self.publish_retries = Counter(
            "esp_publish_retries", "Publish requests retried because a topic was unavailable, by topic.", ["topic"], registry=r
        )
        self.dead_letters = Counter(
            "esp_dead_letters", "Dead letters the worker published, by error type.", ["reason"], registry=r
        )
        self.paused = Gauge(
            "esp_paused", "1 while pulling is paused because this dependency is unavailable.", ["cause"], registry=r
        )
        self.paused_seconds = Counter(
            "esp_paused_seconds", "Time spent paused for an outage of this dependency.", ["cause"], registry=r
        )
        for cause in CAUSES:
            self.paused.labels(cause)
            self.paused_seconds.labels(cause)
        self.lease_extensions = Counter("esp_lease_extensions", "Ack deadlines extended (per message).", registry=r)
        self.lease_extension_errors = Counter(
            "esp_lease_extension_errors", "Lease extensions that failed and were retried before the lease ran out.", registry=r
        )
        self.settle_errors = Counter(
            "esp_settle_errors", "Acks or nacks that failed even after retries (the message will be redelivered).", registry=r
        )
        self.ready = Gauge("esp_ready", "1 while /readyz would answer 200.", registry=r)
        self.alive = Gauge("esp_alive", "1 while every worker thread runs (/healthz would answer 200).", registry=r)
