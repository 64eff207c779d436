"""The wire contracts: every violation class has its own error type and a precise reason."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from esp.contracts import (
    ATTR_ERROR_TYPE,
    ATTR_REASON,
    ATTR_REPLAY_COUNT,
    KIND_POLICY,
    KIND_WORKER,
    MAX_ATTRIBUTE_VALUE_BYTES,
    POLICY_REASON,
    Comment,
    DeadLetter,
    ErrorType,
    InvalidComment,
    Score,
    Stage,
    comment_from_fields,
    dead_letter_for,
    labels_from_outputs,
    parse_comment,
    parse_score,
)

VIOLATIONS = [
    (b'{"id": "a", "text": "x"', ErrorType.INVALID_JSON, "not JSON"),
    (b"[1, 2]", ErrorType.NOT_AN_OBJECT, "JSON object"),
    (b'{"text": "hello"}', ErrorType.MISSING_ID, "no 'id'"),
    (b'{"id": null, "text": "hello"}', ErrorType.MISSING_ID, "no 'id'"),
    (b'{"id": 17, "text": "hello"}', ErrorType.INVALID_ID, "must be a string, got int"),
    (b'{"id": "  ", "text": "hello"}', ErrorType.INVALID_ID, "empty"),
    (json.dumps({"id": "x" * 300, "text": "hi"}).encode(), ErrorType.INVALID_ID, "300 characters"),
    (b'{"id": "a"}', ErrorType.MISSING_TEXT, "no 'text'"),
    (b'{"id": "a", "text": ["hi"]}', ErrorType.NON_STRING_TEXT, "got list"),
    (b'{"id": "a", "text": 3.5}', ErrorType.NON_STRING_TEXT, "got float"),
    (b'{"id": "a", "text": ""}', ErrorType.EMPTY_TEXT, "empty"),
    (b'{"id": "a", "text": " \\n\\t "}', ErrorType.EMPTY_TEXT, "whitespace"),
    (b'{"id": "a", "text": "caf\xe9"}', ErrorType.INVALID_UTF8, "byte 24"),
]


@pytest.mark.parametrize("body,error_type,reason_part", VIOLATIONS)
def test_each_violation_has_its_type_and_reason(body: bytes, error_type: str, reason_part: str) -> None:
    with pytest.raises(InvalidComment) as info:
        parse_comment(body)
    assert info.value.error_type == error_type
    assert reason_part in info.value.reason


def test_body_limit_is_checked_before_decoding() -> None:
    body = json.dumps({"id": "a", "text": "y" * 2000}).encode()
    with pytest.raises(InvalidComment) as info:
        parse_comment(body, max_body_bytes=1000)
    assert info.value.error_type == ErrorType.BODY_TOO_LARGE
    assert f"{len(body)} bytes, the limit is 1000" in info.value.reason
    assert parse_comment(body, max_body_bytes=len(body)).text == "y" * 2000


def test_valid_comment_keeps_unicode_and_ignores_extra_fields() -> None:
    body = json.dumps({"id": "c-1", "text": "naïve 🙂 комментарий", "lang": "ru"}, ensure_ascii=False).encode()
    assert parse_comment(body) == Comment("c-1", "naïve 🙂 комментарий")
    assert parse_comment(Comment("c-1", "naïve 🙂").to_json_bytes()) == Comment("c-1", "naïve 🙂")


def test_fields_path_applies_the_same_rules() -> None:
    with pytest.raises(InvalidComment) as info:
        comment_from_fields("id", "   ")
    assert info.value.error_type == ErrorType.EMPTY_TEXT
    with pytest.raises(InvalidComment) as info:
        comment_from_fields("id", "z" * 100, max_body_bytes=50)
    assert info.value.error_type == ErrorType.BODY_TOO_LARGE


def _score(**kw: object) -> Score:
    base = dict(
        id="c-1",
        probabilities={"toxic": 0.91, "threat": 0.02},
        thresholds={"toxic": 0.5, "threat": 0.3},
        model_name="bert",
        model_version=3,
        truncated=False,
        scored_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc),
        published_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    )
    base.update(kw)
    return Score(**base)  # type: ignore[arg-type]


def test_score_record_and_attributes() -> None:
    score = _score()
    record = parse_score(score.to_json_bytes())
    assert record["id"] == "c-1"
    assert record["scores"] == {"toxic": 0.91, "threat": 0.02}
    assert record["flags"] == ["toxic"]
    assert record["model"] == {"name": "bert", "version": 3}
    assert record["scored_at"] == "2026-01-02T03:04:05.678Z"
    assert record["truncated"] is False
    assert score.attributes() == {
        "schema_version": "1",
        "model_name": "bert",
        "model_version": "3",
        "flagged": "true",
        "truncated": "false",
    }
    calm = _score(probabilities={"toxic": 0.1, "threat": 0.29}, truncated=True)
    assert calm.flags == []
    assert calm.attributes()["flagged"] == "false"
    assert calm.attributes()["truncated"] == "true"


def test_score_with_other_schema_is_refused() -> None:
    with pytest.raises(ValueError, match="schema_version"):
        parse_score(b'{"schema_version": "99", "id": "x"}')


def test_dead_letter_round_trip_keeps_bytes_and_attributes() -> None:
    original = b"\xff\xfe not utf-8 at all"
    dl = dead_letter_for(
        original,
        {"origin": "app-1", ATTR_REPLAY_COUNT: "2"},
        stage=Stage.VALIDATE,
        error_type=ErrorType.INVALID_UTF8,
        reason="body is not valid UTF-8 at byte 0",
        worker="worker-a",
        delivery_attempt=1,
        source_message_id="123",
    )
    attrs = dl.to_attributes()
    assert attrs["origin"] == "app-1"
    assert attrs[ATTR_ERROR_TYPE] == ErrorType.INVALID_UTF8
    assert attrs[ATTR_REPLAY_COUNT] == "2"
    back = DeadLetter.from_pubsub(original, attrs)
    assert back.kind == KIND_WORKER
    assert back.data == original
    assert back.attributes == {"origin": "app-1"}
    assert (back.stage, back.error_type, back.delivery_attempt, back.replay_count) == ("validate", "invalid_utf8", 1, 2)
    assert back.reason == "body is not valid UTF-8 at byte 0"


def test_dead_letter_attribute_values_fit_pubsub_limits() -> None:
    dl = dead_letter_for(
        b"x", {}, stage=Stage.SCORE, error_type=ErrorType.MODEL_REJECTED, reason="é" * 5000, worker="w"
    )
    attrs = dl.to_attributes()
    assert all(len(v.encode()) <= MAX_ATTRIBUTE_VALUE_BYTES for v in attrs.values())
    assert attrs[ATTR_REASON].endswith("...")
    # 100 original attributes: ours still fit within Pub/Sub's limit of 100.
    crowded = dead_letter_for(b"x", {f"k{i}": "v" for i in range(100)}, stage="s", error_type="e", reason="r", worker="w")
    crowded_attrs = crowded.to_attributes()
    assert len(crowded_attrs) <= 100
    assert crowded_attrs[ATTR_ERROR_TYPE] == "e"


def test_policy_forwarded_dead_letter_is_recognised() -> None:
    attrs = {
        "origin": "app",
        "CloudPubSubDeadLetterSourceDeliveryCount": "5",
        "CloudPubSubDeadLetterSourceSubscription": "comments-scoring",
        "CloudPubSubDeadLetterSourceSubscriptionProject": "p",
    }
    dl = DeadLetter.from_pubsub(b"{}", attrs)
    assert dl.kind == KIND_POLICY
    assert dl.reason == POLICY_REASON
    assert dl.delivery_attempt == 5
    assert dl.attributes == {"origin": "app"}


def test_labels_are_the_outputs_without_the_esp_prefix() -> None:
    keys = ["toxic", "esp_threshold_toxic", "insult", "esp_truncated"]
    assert labels_from_outputs(keys) == ["insult", "toxic"]


def test_dead_letter_keeps_the_comments_ordering_key_as_an_attribute() -> None:
    dl = dead_letter_for(b"{}", {"a": "1"}, stage="s", error_type="e", reason="r", worker="w", ordering_key="user-42")
    attrs = dl.to_attributes()
    assert attrs["esp_ordering_key"] == "user-42"
    # Read back from a dead-letter message published without a key of its own.
    back = DeadLetter.from_pubsub(b"{}", attrs)
    assert back.ordering_key == "user-42"
    assert back.attributes == {"a": "1"}
    # A key on the dead-letter message itself wins.
    assert DeadLetter.from_pubsub(b"{}", attrs, ordering_key="k2").ordering_key == "k2"
