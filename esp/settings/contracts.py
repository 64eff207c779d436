"""Limits of the comment contract (esp.contracts), shared by publish, the worker and the Beam jobs."""

from __future__ import annotations

from dataclasses import dataclass

from esp.contracts import DEFAULT_MAX_BODY_BYTES
from esp.settings.base import require, setting


@dataclass(frozen=True)
class CommentSettings:
    max_body_bytes: int = setting(
        DEFAULT_MAX_BODY_BYTES,
        env="ESP_MAX_BODY_BYTES",
        help="Largest comment body accepted, bytes; larger ones are dead-lettered (publish rejects them).",
    )

    def __post_init__(self) -> None:
        # Pub/Sub's own message limit is 10 MB.
        require(64 <= self.max_body_bytes <= 10_000_000, "max_body_bytes must be between 64 and 10,000,000")
