"""Settings of the scoring engine (esp.engine) that the worker and the HTTP API share: batching and
how long to wait between retries while the model server is unavailable.

Defaults are chosen for one process in front of one model server: batches of 32 (where the small
BERT's throughput levels off, DESIGN.md), two batches in flight so the model server never waits
for the next one. `esp api` defaults to batches of 16 (API_BATCH_SIZE): with a few hundred clients
it has far fewer comments waiting than a worker's pull, and the narrower the batch, the closer in
length its comments (docs/api.md measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting


API_BATCH_SIZE = 16


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = setting(32, env="ESP_MAX_BATCH_SIZE", help="Most comments in one Predict call (esp api: 16 by default).")
    max_batch_latency_ms: float = setting(
        20.0,
        env="ESP_MAX_BATCH_LATENCY_MS",
        help="Longest a comment waits for its batch to fill before the batch is sent anyway, milliseconds.",
    )
    batches_in_flight: int = setting(
        2,
        env="ESP_BATCHES_IN_FLIGHT",
        help="Batches scored concurrently; 2 keeps the model server busy while the last answer is published.",
    )
    length_grouping: bool = setting(
        True,
        env="ESP_LENGTH_GROUPING",
        help="Batch comments of similar length together so the model pads less (the oldest waiting comment is always in the next batch).",
    )
    retry_initial_backoff_s: float = setting(
        0.2,
        env="ESP_RETRY_INITIAL_BACKOFF_S",
        help="First wait before retrying a batch the model server (or a topic) could not take, seconds; doubles each time.",
    )
    retry_max_backoff_s: float = setting(
        2.0,
        env="ESP_RETRY_MAX_BACKOFF_S",
        help="Cap of that wait, seconds: after an outage, work resumes within about this long of the service's return.",
    )
    idle_probe_interval_s: float = setting(
        5.0,
        env="ESP_IDLE_PROBE_INTERVAL_S",
        help="While no comments arrive, ask the model server this often whether it still serves the model, seconds, "
        "so /readyz stays true when no batch is there to fail.",
    )

    def __post_init__(self) -> None:
        require(1 <= self.max_batch_size <= 4096, "max_batch_size must be between 1 and 4096")
        require(0 <= self.max_batch_latency_ms <= 60_000, "max_batch_latency_ms must be between 0 and 60,000")
        require(1 <= self.batches_in_flight <= 64, "batches_in_flight must be between 1 and 64")
        require(
            0 < self.retry_initial_backoff_s <= self.retry_max_backoff_s,
            "retry backoff must satisfy 0 < retry_initial_backoff_s <= retry_max_backoff_s",
        )
        require(self.idle_probe_interval_s > 0, "idle_probe_interval_s must be positive")
