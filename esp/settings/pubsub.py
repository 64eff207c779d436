"""Pub/Sub resource names and policies: one group shared by init, publish, the worker and replay."""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting


@dataclass(frozen=True)
class PubSubSettings:
    project: str = setting(
        "local-project", env="ESP_PROJECT", help="GCP project id that owns the topics and subscriptions."
    )
    emulator_host: str | None = setting(
        None,
        env="PUBSUB_EMULATOR_HOST",
        help="host:port of a Pub/Sub emulator; unset means real Pub/Sub (the standard variable, as gcloud sets it).",
    )
    comments_topic: str = setting("comments", env="ESP_COMMENTS_TOPIC", help="Topic producers publish comments to.")
    scores_topic: str = setting("comment-scores", env="ESP_SCORES_TOPIC", help="Topic the worker publishes scores to.")
    dead_letter_topic: str = setting(
        "comments-dead-letter", env="ESP_DEAD_LETTER_TOPIC", help="Topic for comments that cannot be scored."
    )
    subscription: str = setting(
        "comments-scoring", env="ESP_SUBSCRIPTION", help="The worker's subscription on the comments topic."
    )
    dead_letter_subscription: str = setting(
        "comments-dead-letter-hold",
        env="ESP_DEAD_LETTER_SUBSCRIPTION",
        help="Subscription that holds dead letters for inspection and replay.",
    )
    max_delivery_attempts: int = setting(
        5, env="ESP_MAX_DELIVERY_ATTEMPTS", help="Deliveries before Pub/Sub dead-letters a comment (5..100)."
    )
    ack_deadline_s: int = setting(
        60, env="ESP_ACK_DEADLINE_S", help="Ack deadline of the worker's subscription, seconds (10..600)."
    )
    min_retry_backoff_s: int = setting(
        10, env="ESP_MIN_RETRY_BACKOFF_S", help="Redelivery backoff after a nack, lower bound, seconds (0..600)."
    )
    max_retry_backoff_s: int = setting(
        600, env="ESP_MAX_RETRY_BACKOFF_S", help="Redelivery backoff after a nack, upper bound, seconds (0..600)."
    )
    dead_letter_retention_days: int = setting(
        7, env="ESP_DEAD_LETTER_RETENTION_DAYS", help="How long the dead-letter subscription keeps messages (1..7)."
    )
    pubsub_timeout_s: float = setting(
        30.0, env="ESP_PUBSUB_TIMEOUT_S", help="Deadline for one Pub/Sub admin or publish call, seconds."
    )
    feedback_topic: str = setting(
        "comment-feedback",
        env="ESP_FEEDBACK_TOPIC",
        help="Topic the HTTP API publishes suggested scores to (Perspective's comments:suggestscore): labelled data for training.",
    )
    feedback_subscription: str = setting(
        "comment-feedback-hold",
        env="ESP_FEEDBACK_SUBSCRIPTION",
        help="Subscription that keeps suggested scores until training reads them (7 days).",
    )

    def __post_init__(self) -> None:
        for name in ("comments_topic", "scores_topic", "dead_letter_topic", "subscription", "dead_letter_subscription", "feedback_topic", "feedback_subscription"):
            value = getattr(self, name)
            # Pub/Sub ids: 3..255 chars, start with a letter, no "goog" prefix.
            require(3 <= len(value) <= 255 and value[:1].isalpha(), f"{name} {value!r}: ids need 3-255 characters and must start with a letter")
        require(5 <= self.max_delivery_attempts <= 100, "max_delivery_attempts must be between 5 and 100 (Pub/Sub's limits)")
        require(10 <= self.ack_deadline_s <= 600, "ack_deadline_s must be between 10 and 600")
        require(0 <= self.min_retry_backoff_s <= self.max_retry_backoff_s <= 600, "retry backoff must satisfy 0 <= min <= max <= 600")
        require(1 <= self.dead_letter_retention_days <= 7, "dead_letter_retention_days must be between 1 and 7")
        require(self.pubsub_timeout_s > 0, "pubsub_timeout_s must be positive")

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        return f"projects/{self.project}/subscriptions/{subscription}"
