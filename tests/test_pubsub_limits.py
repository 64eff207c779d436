"""Local Pub/Sub clients carry what production carries: messages close to Pub/Sub's 10 MB limit.

gRPC's default receive limit is 4 MiB; the client library lifts it on its production channels, and
esp.pubsub lifts it on the emulator's, so a local test can reach the real edge.
"""

from __future__ import annotations

import hashlib

from esp.pubsub import publisher_client
from esp.pubsub_admin import init_resources
from esp.settings import PubSubSettings
from tests.fixtures.pubsub import pull_until


def test_a_message_near_10_mb_round_trips_through_the_emulator(pubsub_settings: PubSubSettings) -> None:
    s = pubsub_settings
    init_resources(s)
    # 9.9 MB of data plus attributes: under the 10,000,000-byte request limit, over 4 MiB twice.
    body = hashlib.sha256(b"seed").digest() * (9_900_000 // 32)
    attributes = {"origin": "app-1", "k" * 200: "v" * 1000}
    publisher = publisher_client(s)
    try:
        publisher.publish(s.topic_path(s.dead_letter_topic), body, **attributes).result(timeout=60)
    finally:
        publisher.stop()
        publisher.transport.close()
    [received] = pull_until(s, s.dead_letter_subscription, 1, timeout_s=60)
    assert len(received.message.data) == len(body) and received.message.data == body
    assert dict(received.message.attributes) == attributes

