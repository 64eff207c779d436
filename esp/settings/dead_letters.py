"""Dead-letter tooling settings: how `esp dead-letters` leases, replays, parks and paces messages."""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting


@dataclass(frozen=True)
class DeadLetterSettings:
    max_replays: int = setting(
        3,
        env="ESP_MAX_REPLAYS",
        help="Replays a dead letter may have (0..999); one that would exceed this is parked instead of replayed.",
    )
    park_topic: str | None = setting(
        None,
        env="ESP_PARK_TOPIC",
        help="Topic parked dead letters go to; unset means the dead-letter topic itself (marked esp_parked=true).",
    )
    dead_letter_lease_s: int = setting(
        30,
        env="ESP_DEAD_LETTER_LEASE_S",
        help="Lease held on each pulled dead letter, renewed while in use, seconds (10..600). An interrupted "
        "run's messages become visible again after at most this long.",
    )
    pull_idle_s: float = setting(
        3.0,
        env="ESP_DEAD_LETTER_PULL_IDLE_S",
        help="A scan ends once the dead-letter subscription has returned nothing for this long, seconds.",
    )
    min_scan_s: float = setting(
        0.0,
        env="ESP_DEAD_LETTER_MIN_SCAN_S",
        help="Keep scanning at least this long, seconds, even when the subscription looks empty. After an "
        "interrupted run, set it to the lease (--dead-letter-lease-s) so the messages that run held are seen.",
    )
    max_scan_s: float = setting(
        1800.0,
        env="ESP_DEAD_LETTER_MAX_SCAN_S",
        help="A scan ends after this long, seconds, even while dead letters keep arriving (Pub/Sub cannot tell "
        "which were there when it began); the summary says so and a re-run continues.",
    )
    replay_window: int = setting(
        100,
        env="ESP_REPLAY_WINDOW",
        help="Most republishes in flight before their dead letters are acked: bounds duplicates after a crash.",
    )

    def __post_init__(self) -> None:
        # esp_replay_count is believed only up to 1000 (esp.contracts.MAX_REPLAY_COUNT).
        require(0 <= self.max_replays <= 999, "max_replays must be between 0 and 999")
        require(10 <= self.dead_letter_lease_s <= 600, "dead_letter_lease_s must be between 10 and 600 (Pub/Sub's limits)")
        require(self.pull_idle_s > 0, "pull_idle_s must be positive")
        require(self.min_scan_s >= 0, "min_scan_s must be 0 or more")
        require(self.max_scan_s > 0, "max_scan_s must be positive")
        require(self.max_scan_s >= self.min_scan_s, "max_scan_s must be at least min_scan_s")
        require(1 <= self.replay_window <= 1000, "replay_window must be between 1 and 1000")
        if self.park_topic is not None:
            require(
                3 <= len(self.park_topic) <= 255 and self.park_topic[:1].isalpha(),
                f"park_topic {self.park_topic!r}: ids need 3-255 characters and must start with a letter",
            )
