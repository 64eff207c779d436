"""Settings of the scoring worker (`esp worker run`): flow control, leases, health, shutdown.

Batching lives in BatchingSettings (esp/settings/batching.py), shared with the HTTP API. The
outstanding-message bound keeps RSS flat whatever the backlog.
"""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting


@dataclass(frozen=True)
class WorkerSettings:
    backend: str = setting(
        "tfserving",
        env="ESP_BACKEND",
        help="Where the model runs: `tfserving` (the model server over gRPC; the worker loads no TensorFlow) "
        "or `saved_model` (in this process, from --saved-model-dir).",
        choices=("tfserving", "saved_model"),
    )
    saved_model_dir: str | None = setting(
        None,
        env="ESP_SAVED_MODEL_DIR",
        help="Model base path (`<dir>/<version>/saved_model.pb`) or one version's directory, for --backend saved_model.",
    )
    max_outstanding_messages: int = setting(
        2000,
        env="ESP_MAX_OUTSTANDING_MESSAGES",
        help="Most comments held (pulled, not yet acked or nacked) at once; the worker stops pulling at this bound.",
    )
    max_outstanding_bytes: int = setting(
        32 * 1024 * 1024,
        env="ESP_MAX_OUTSTANDING_BYTES",
        help="Most message bytes (body, attributes and ordering key) held at once; the worker stops pulling at this bound "
        "and sizes each pull to the room left at the mean message size seen, so it overshoots by about one message "
        "(at most one pull's messages, when they are larger than the mean).",
    )
    pull_max_messages: int = setting(
        500, env="ESP_PULL_MAX_MESSAGES", help="Most messages asked for in one unary Pull."
    )
    pull_timeout_s: float = setting(
        2.0,
        env="ESP_PULL_TIMEOUT_S",
        help="Deadline of one Pull, seconds; an idle subscription answers empty after about this long, so it also bounds how long shutdown waits for a pull.",
    )
    lease_extension_s: int = setting(
        60,
        env="ESP_LEASE_EXTENSION_S",
        help="Ack deadline set on each lease extension (modify_ack_deadline), seconds (10..600).",
    )
    lease_margin_s: float = setting(
        5.0,
        env="ESP_LEASE_MARGIN_S",
        help="Extend a held message's lease when less than this is left of it, seconds "
        "(capped at half the lease, so a 10 s ack deadline is extended after 5 s).",
    )
    max_lease_duration_s: float = setting(
        3600.0,
        env="ESP_MAX_LEASE_DURATION_S",
        help="Stop extending a message held this long, seconds, and let Pub/Sub redeliver it; bounds what a stuck worker can hold.",
    )
    shutdown_grace_s: float = setting(
        20.0,
        env="ESP_SHUTDOWN_GRACE_S",
        help="On SIGTERM/SIGINT, how long in-flight batches may take to finish before the rest is nacked, seconds "
        "(keep it below the pod's terminationGracePeriodSeconds).",
    )
    metrics_port: int = setting(
        8080,
        env="ESP_METRICS_PORT",
        help="Port of the worker's HTTP server: /metrics (Prometheus), /healthz, /readyz; 0 picks a free port.",
    )
    metrics_host: str = setting(
        "0.0.0.0",  # nosec B104: a pod must answer its kubelet's probes and the scraper on the pod IP
        env="ESP_METRICS_HOST",
        help="Address the worker's HTTP server listens on.",
    )
    worker_id: str | None = setting(
        None,
        env="ESP_WORKER_ID",
        help="Name written on dead letters and logs; default: the host name and pid (the pod name on Kubernetes).",
    )

    def __post_init__(self) -> None:
        require(self.max_outstanding_bytes >= 1024 * 1024, "max_outstanding_bytes must be at least 1 MiB")
        require(1 <= self.pull_max_messages <= 1000, "pull_max_messages must be between 1 and 1000 (Pub/Sub's limit)")
        require(self.pull_timeout_s > 0, "pull_timeout_s must be positive")
        require(10 <= self.lease_extension_s <= 600, "lease_extension_s must be between 10 and 600 (Pub/Sub's limits)")
        require(0 < self.lease_margin_s < self.lease_extension_s, "lease_margin_s must be positive and below lease_extension_s")
        require(self.max_lease_duration_s > 0, "max_lease_duration_s must be positive")
        require(self.shutdown_grace_s >= 0, "shutdown_grace_s must not be negative")
        require(0 <= self.metrics_port <= 65535, "metrics_port must be between 0 and 65535")
        require(
            self.backend != "saved_model" or bool(self.saved_model_dir),
            "--backend saved_model needs --saved-model-dir",
        )
