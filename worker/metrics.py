"""The worker's Prometheus metrics, counted where the thing happens (STYLE.md point 10).

Each Worker owns its own registry, so several workers can run in one process (the tests do) and
`/metrics` shows exactly one worker's numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Outcomes of a pulled message (the `outcome` label of esp_messages_total).
SCORED = "scored"  # score published and confirmed, message acked
DEAD_LETTERED = "dead_lettered"  # dead letter published and confirmed, message acked
NACKED_REJECTED = "nacked_rejected"  # the model refused it; redelivered (spends one attempt)
NACKED_SHUTDOWN = "nacked_shutdown"  # handed back on shutdown
NACKED_PUBLISH_FAILED = "nacked_publish_failed"  # its score or dead letter could not be published
OUTCOMES = (SCORED, DEAD_LETTERED, NACKED_REJECTED, NACKED_SHUTDOWN, NACKED_PUBLISH_FAILED)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter("esp_messages", "Pulled comments by final outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        self.pulled = Counter("esp_pulled_messages", "Messages received from Pull.", registry=r)
        self.batch_size = Histogram("esp_batch_size", "Comments per Predict batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.scoring_latency = Histogram(
            "esp_scoring_latency_seconds",
            "Time to score one batch, including splitting a rejected batch, excluding outage retries.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "esp_end_to_end_latency_seconds",
            "From the comment's Pub/Sub publish time to its score's confirmed publish.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("esp_in_flight_messages", "Messages held: pulled, not yet acked or nacked.", registry=r)
        self.in_flight_bytes = Gauge("esp_in_flight_bytes", "Body bytes of the messages held.", registry=r)
        self.retries = Counter("esp_retries", "Batch retries after the model server could not take it.", registry=r)
        self.dead_letters = Counter(
            "esp_dead_letters", "Dead letters the worker published, by error type.", ["reason"], registry=r
        )
        self.paused = Gauge("esp_paused_for_outage", "1 while pulling is paused because the model server is unavailable.", registry=r)
        self.paused_seconds = Counter(
            "esp_paused_for_outage_seconds", "Time spent paused for a model server outage.", registry=r
        )
        self.lease_extensions = Counter("esp_lease_extensions", "Ack deadlines extended (per message).", registry=r)
        self.settle_errors = Counter(
            "esp_settle_errors", "Ack, nack or lease-extension calls that failed (the message will be redelivered).", registry=r
        )
        self.ready = Gauge("esp_ready", "1 while /readyz answers 200.", registry=r)
