"""Publishing to one topic, one request per batch, so that no fault is blamed on the wrong thing.

A Publish call can fail for two different reasons, and each is handled as what it is:
- the topic or Pub/Sub is unavailable (UNAVAILABLE, a deadline, NOT_FOUND for a deleted topic,
  PERMISSION_DENIED after an IAM change...): an outage. The caller's messages are not at fault, so
  nothing is nacked (every nack spends a delivery attempt). The publisher opens the outage in
  esp.outages (the worker stops pulling; /readyz says why), retries with capped backoff, and closes
  it on success. It gives up only when `give_up()` says so (shutdown's grace is over).
- Pub/Sub refused the request for its content (INVALID_ARGUMENT, or a request too large for the
  channel): the batch is split in halves until the refused message is alone, so its neighbours
  are published and only it is reported, with Pub/Sub's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from esp.outages import Outages

log = logging.getLogger(__name__)

# One Publish request carries at most 1,000 messages and 10 MB (Pub/Sub's limits); ESP keeps a
# margin under the byte limit for the request's own framing.
MAX_MESSAGES_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 9_500_000
# Per-message framing inside a PublishRequest, on top of data and attributes (a generous bound).
_MESSAGE_OVERHEAD_BYTES = 64

PUBLISHED = True  # one message's result: published and confirmed
GAVE_UP = None  # one message's result: not published, the outage outlasted the grace (shutdown)
# Otherwise a message's result is a str: why Pub/Sub refused it, even alone.
Result = bool | str | None


def message_size(data: bytes, attributes: Mapping[str, str]) -> int:
    return len(data) + sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) + 8 for k, v in attributes.items()) + _MESSAGE_OVERHEAD_BYTES


def is_content_fault(exc: BaseException) -> bool:
    """True when Pub/Sub (or the channel) refused a Publish for what it carries, not for being down."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.InvalidArgument):
        return True
    # gRPC refuses a request larger than the channel's limit with RESOURCE_EXHAUSTED, on this side.
    return isinstance(exc, gexc.ResourceExhausted) and "larger than max" in str(exc)


class TopicPublisher:
    def __init__(
        self,
        publish_request: Callable[..., Any],
        topic_path: str,
        *,
        cause: str,
        outages: Outages,
        timeout_s: float,
        initial_backoff_s: float,
        max_backoff_s: float,
        give_up: Callable[[], bool],
        on_retry: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._publish_request = publish_request
        self.topic_path = topic_path
        self.cause = cause
        self._outages = outages
        self._timeout_s = timeout_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._give_up = give_up
        self._on_retry = on_retry
        self._sleep = sleep

    def publish(self, messages: Sequence[tuple[bytes, Mapping[str, str]]]) -> list[Result]:
        """Publishes (data, attributes) pairs; one result per message, aligned with the input."""
        results: list[Result] = [GAVE_UP] * len(messages)
        sizes = [message_size(data, attrs) for data, attrs in messages]
        chunk: list[int] = []
        chunk_bytes = 0
        for i, size in enumerate(sizes):
            if chunk and (len(chunk) == MAX_MESSAGES_PER_REQUEST or chunk_bytes + size > MAX_REQUEST_BYTES):
                self._send(messages, chunk, results)
                chunk, chunk_bytes = [], 0
            chunk.append(i)
            chunk_bytes += size
        if chunk:
            self._send(messages, chunk, results)
        return results

    def _send(self, messages: Sequence[tuple[bytes, Mapping[str, str]]], idx: list[int], results: list[Result]) -> None:
        backoff = self._initial_backoff_s
        in_outage = False
        try:
            while True:
                try:
                    self._call([messages[i] for i in idx])
                except Exception as exc:  # classified below: content fault or outage, never dropped
                    if is_content_fault(exc):
                        if in_outage:
                            self._outages.end(self.cause)
                            in_outage = False
                        self._split(messages, idx, results, exc)
                        return
                    reason = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
                    if in_outage:
                        self._outages.update(self.cause, reason)
                    else:
                        self._outages.begin(self.cause, reason)
                        in_outage = True
                    if self._wait_or_give_up(backoff):
                        log.warning("gave up publishing %d messages to %s at shutdown: %s", len(idx), self.topic_path, reason)
                        return  # results stay GAVE_UP
                    self._on_retry()
                    backoff = min(backoff * 2, self._max_backoff_s)
                    continue
                for i in idx:
                    results[i] = PUBLISHED
                return
        finally:
            if in_outage:
                self._outages.end(self.cause)

    def _split(self, messages: Sequence[tuple[bytes, Mapping[str, str]]], idx: list[int], results: list[Result], exc: Exception) -> None:
        if len(idx) == 1:
            results[idx[0]] = f"Pub/Sub refused it: {getattr(exc, 'message', None) or exc}"
            return
        mid = len(idx) // 2
        self._send(messages, idx[:mid], results)
        self._send(messages, idx[mid:], results)

    def _call(self, batch: list[tuple[bytes, Mapping[str, str]]]) -> None:
        from google.pubsub_v1.types import PublishRequest

        request = PublishRequest.pb()(topic=self.topic_path)
        for data, attributes in batch:
            message = request.messages.add()
            message.data = data
            message.attributes.update(attributes)
        # retry=None: the library's own retry would hide an outage for minutes; ours pauses and says so.
        self._publish_request(request=PublishRequest.wrap(request), timeout=self._timeout_s, retry=None)

    def _wait_or_give_up(self, seconds: float) -> bool:
        """Sleeps `seconds` in short slices; True as soon as `give_up()` says to stop retrying."""
        end = time.monotonic() + seconds
        while True:
            if self._give_up():
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._sleep(min(0.1, left))
