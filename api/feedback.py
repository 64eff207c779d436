"""Publishes suggested scores (Perspective's comments:suggestscore) to the feedback topic.

Each suggestion is one JSON message (`Suggestion.record`, documented in docs/api.md) on
PubSubSettings.feedback_topic, kept by its hold subscription (`esp pubsub init`) for the next
training run. The answer is sent only after Pub/Sub confirmed the publish; a publish that fails or
times out is answered 503 with the reason, so the client knows the suggestion was not kept.
The client is created on first use: an API that never receives a suggestion needs no Pub/Sub.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from api.errors import ApiError, Reason
from esp.errors import EspError
from esp.pubsub import check_reachable, publisher_client, where
from esp.settings import PubSubSettings

log = logging.getLogger(__name__)


class FeedbackPublisher:
    def __init__(self, pubsub: PubSubSettings, *, timeout_s: float) -> None:
        self.pubsub = pubsub
        self.timeout_s = timeout_s
        self.topic = pubsub.topic_path(pubsub.feedback_topic)
        self._client: Any = None
        self._lock = threading.Lock()

    def _publisher(self) -> Any:
        with self._lock:
            if self._client is None:
                check_reachable(self.pubsub)
                self._client = publisher_client(self.pubsub)
            return self._client

    async def publish(self, record: dict[str, Any]) -> str:
        """Publishes one suggestion; returns its message id once Pub/Sub confirmed it."""
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        loop = asyncio.get_running_loop()
        try:
            client = await loop.run_in_executor(None, self._publisher)
            future = client.publish(self.topic, data, schema_version=record["schema_version"], source="suggestscore")
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            reason = f"{where(self.pubsub)} did not confirm the publish within {self.timeout_s:g} s"
        except EspError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - any client failure means "not kept": say so, with its reason
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("suggested score not published to %s: %s", self.topic, reason)
        raise ApiError(503, Reason.FEEDBACK_UNAVAILABLE, f"the suggestion was not stored: {reason}", retry_after_s=5)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.stop()
                self._client = None
