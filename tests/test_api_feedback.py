"""Perspective's comments:suggestscore against Google's Pub/Sub emulator: `esp pubsub init` creates the
feedback topic and its hold subscription, the API publishes each suggestion there before answering,
and answers 503 with the reason when Pub/Sub cannot take it."""

from __future__ import annotations

import json

from api.local import ApiProcess
from esp.localstack import free_port
from esp.pubsub_admin import init_resources
from esp.settings import PubSubSettings
from tests.fixtures import perspective_docs as docs
from tests.fixtures.pubsub import pull_until


def test_init_creates_the_feedback_topic_and_hold_subscription(pubsub_settings: PubSubSettings) -> None:
    from esp.pubsub import subscriber_client

    report = init_resources(pubsub_settings)
    names = {c.name for c in report.changes if c.action == "created"}
    assert pubsub_settings.topic_path(pubsub_settings.feedback_topic) in names
    assert pubsub_settings.subscription_path(pubsub_settings.feedback_subscription) in names
    client = subscriber_client(pubsub_settings)
    try:
        hold = client.get_subscription(request={"subscription": pubsub_settings.subscription_path(pubsub_settings.feedback_subscription)})
    finally:
        client.close()
    assert hold.topic == pubsub_settings.topic_path(pubsub_settings.feedback_topic)
    assert hold.message_retention_duration.total_seconds() == 7 * 24 * 3600
    assert all(c.action == "unchanged" for c in init_resources(pubsub_settings).changes)


def test_suggested_score_is_published_before_the_answer(start_api, pubsub_settings: PubSubSettings) -> None:
    init_resources(pubsub_settings)
    api: ApiProcess = start_api(pubsub_settings)
    status, _, body = api.post_json("/v1alpha1/comments:suggestscore", docs.SUGGEST_REQUEST)
    assert status == 200 and body == docs.SUGGEST_RESPONSE
    spans = {"comment": {"text": "Nice work. You idiot."}, "attributeScores": {"INSULT": {"spanScores": [{"begin": 11, "end": 21, "score": {"value": 1}}]}},
             "languages": ["en"], "sessionId": "s1"}
    status, _, body = api.post_json("/v1alpha1/comments:suggestscore", spans)
    assert status == 200 and body == {"requestedLanguages": ["en"]}

    received = pull_until(pubsub_settings, pubsub_settings.feedback_subscription, 2, timeout_s=30)
    assert len(received) == 2
    records = sorted((json.loads(r.message.data) for r in received), key=lambda r: r["text"])
    first = next(r for r in records if r["client_token"] == "comment-53922")
    assert first["text"] == docs.SUGGEST_REQUEST["comment"]["text"] and first["labels"] == {"toxic": 0.0}
    assert first["community_id"] == "/forum/movies" and first["schema_version"] == "1" and first["suggested_at"].endswith("Z")
    second = next(r for r in records if r["session_id"] == "s1")
    assert second["spans"] == {"insult": [{"begin": 11, "end": 21, "value": 1.0}]} and second["labels"] == {}
    assert {r.message.attributes["source"] for r in received} == {"suggestscore"}

    status, _, body = api.post_json("/v1alpha1/comments:suggestscore", {"comment": {"text": "x"}, "attributeScores": {}})
    assert status == 400 and body["error"]["details"][0]["errorType"] == "NO_REQUESTED_ATTRIBUTES"


def test_suggestion_pubsub_cannot_take_is_answered_503(start_api, emulator) -> None:
    nowhere = PubSubSettings(project="esp-test-nowhere", emulator_host=f"127.0.0.1:{free_port()}")
    api: ApiProcess = start_api(nowhere)
    status, headers, body = api.post_json("/v1alpha1/comments:suggestscore", docs.SUGGEST_REQUEST)
    assert status == 503 and int(headers["retry-after"]) >= 1
    error = body["error"]
    assert error["details"][0]["reason"] == "feedback_unavailable" and "not stored" in error["message"] and "emulator" in error["message"]
    # Scoring does not need Pub/Sub at all.
    assert api.post_json("/v1/score", {"text": "still scoring"})[0] == 200
