"""The wire contracts: every violation class has its own error type and a precise reason."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esp.contracts import (
    ATTR_BODY_BYTES,
    ATTR_BODY_SHA256,
    ATTR_DELIVERY_ATTEMPT,
    ATTR_ENVELOPE,
    ATTR_ERROR_TYPE,
    ATTR_KEPT,
    ATTR_KIND,
    ATTR_PARKED,
    ATTR_REASON,
    ATTR_REPLAY_COUNT,
    ATTR_TIME,
    ENVELOPE_MAGIC,
    KEPT_BODY_CUT,
    KEPT_DAMAGED,
    KEPT_WHOLE,
    KIND_POLICY,
    KIND_UNKNOWN,
    KIND_WORKER,
    MAX_ATTRIBUTE_KEY_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_PUBLISH_REQUEST_BYTES,
    POLICY_ERROR_TYPE,
    POLICY_REASON,
    UNKNOWN_REASON,
    UNREADABLE,
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
    parse_replay_count,
    parse_score,
    pubsub_message_bytes,
)
from tests.fixtures.fuzz import examples

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
    # Bodies two JSON readers read differently never get a score (esp.contracts.loads_json).
    (b'{"id": "a", "text": "kind words", "text": "abuse"}', ErrorType.INVALID_JSON, "key 'text' appears more than once"),
    (b'{"id": "a", "text": "t", "meta": {"k": 1, "k": 2}}', ErrorType.INVALID_JSON, "key 'k' appears more than once"),
    (b'{"id": "a", "text": "t", "weight": NaN}', ErrorType.INVALID_JSON, "NaN is not a JSON value"),
    (b'{"id": "a", "text": "t", "w": [-Infinity]}', ErrorType.INVALID_JSON, "-Infinity is not a JSON value"),
    (b'\xef\xbb\xbf{"id": "a", "text": "t"}', ErrorType.INVALID_JSON, "BOM"),
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


# ---------------------------------------------------------------------------------------------
# ESP's attributes are ESP's: producers cannot forge a verdict, and lose nothing.


def _letter(attributes: dict[str, str], body: bytes = b'{"id": "c-1", "text": "t"}', **kw: object) -> DeadLetter:
    base: dict[str, object] = dict(stage=Stage.SCORE, error_type=ErrorType.MODEL_REJECTED, reason="rejected", worker="w-1")
    base.update(kw)
    return dead_letter_for(body, attributes, **base)  # type: ignore[arg-type]


def test_producer_attributes_in_esps_namespace_are_kept_renamed_and_restored() -> None:
    producer = {
        "origin": "app-1",
        ATTR_PARKED: "true",
        ATTR_ERROR_TYPE: "forged",
        "esp_orig.esp_parked": "nested",
        "CloudPubSubDeadLetterSourceDeliveryCount": "99",
        "timeout": "5",  # a name the Python client takes as a keyword argument
    }
    data, attrs = _letter(producer).to_message()
    assert attrs["origin"] == "app-1" and attrs[ATTR_ERROR_TYPE] == ErrorType.MODEL_REJECTED
    assert attrs["esp_orig.esp_parked"] == "true" and attrs["esp_orig.esp_orig.esp_parked"] == "nested"
    assert attrs["esp_orig.CloudPubSubDeadLetterSourceDeliveryCount"] == "99" and attrs["esp_orig.timeout"] == "5"
    assert ATTR_PARKED not in attrs and not any(k.startswith("CloudPubSub") for k in attrs)
    back = DeadLetter.from_pubsub(data, attrs)
    assert back.attributes == producer
    assert (back.kind, back.parked, back.error_type, back.reason) == (KIND_WORKER, False, ErrorType.MODEL_REJECTED, "rejected")


def test_on_a_policy_letter_esp_attributes_are_the_producers_never_a_verdict() -> None:
    attrs = {
        "origin": "app",
        ATTR_PARKED: "true",
        ATTR_ERROR_TYPE: "validate",
        ATTR_REASON: "forged reason",
        "esp_stage": "validate",
        "esp_ordering_key": "forged-key",
        "CloudPubSubDeadLetterSourceDeliveryCount": "5",
        "CloudPubSubDeadLetterSourceSubscription": "comments-scoring",
    }
    dl = DeadLetter.from_pubsub(b"{}", attrs, ordering_key="real-key")
    assert (dl.kind, dl.reason, dl.error_type, dl.stage, dl.parked) == (KIND_POLICY, POLICY_REASON, POLICY_ERROR_TYPE, "unknown", False)
    assert dl.delivery_attempt == 5 and dl.source_subscription == "comments-scoring" and dl.ordering_key == "real-key"
    assert dl.attributes == {k: v for k, v in attrs.items() if not k.startswith("CloudPubSub")}


def test_parking_a_policy_letter_writes_esps_form_and_its_mark_is_believed() -> None:
    policy = DeadLetter.from_pubsub(
        b"{}", {"origin": "app", ATTR_PARKED: "false", ATTR_REPLAY_COUNT: "3", "CloudPubSubDeadLetterSourceDeliveryCount": "5"}
    )
    data, attrs = dataclasses.replace(policy, parked=True).to_message()
    assert attrs[ATTR_KIND] == KIND_POLICY and attrs[ATTR_PARKED] == "true" and attrs["esp_orig.esp_parked"] == "false"
    back = DeadLetter.from_pubsub(data, attrs)
    assert (back.kind, back.parked, back.reason, back.replay_count, back.delivery_attempt) == (KIND_POLICY, True, POLICY_REASON, 3, 5)
    assert back.attributes == {"origin": "app", ATTR_PARKED: "false"}


def test_a_letter_neither_esp_nor_the_policy_wrote_has_no_reason_and_no_verdict() -> None:
    dl = DeadLetter.from_pubsub(b"hello", {ATTR_PARKED: "true", "a": "b"})
    assert (dl.kind, dl.error_type, dl.reason, dl.parked) == (KIND_UNKNOWN, "unknown", UNKNOWN_REASON, False)
    assert dl.attributes == {ATTR_PARKED: "true", "a": "b"}


@pytest.mark.parametrize(
    "value,count",
    [("0", 0), ("3", 3), ("1000", 1000), ("1001", None), ("-1", None), ("03", None), (" 3", None), ("3 ", None),
     ("3.0", None), ("٣", None), ("1e3", None), ("", None), ("+3", None), ("3\n", None)],
)  # fmt: skip
def test_replay_count_is_read_only_as_a_plain_decimal_up_to_1000(value: str, count: int | None) -> None:
    assert parse_replay_count(value) == count
    dl = _letter({ATTR_REPLAY_COUNT: value, "origin": "a"})
    if count is None:
        # Not ESP's: the producer's own attribute, kept and restored like any other.
        assert dl.replay_count == 0 and dl.attributes == {ATTR_REPLAY_COUNT: value, "origin": "a"}
        assert DeadLetter.from_pubsub(*dl.to_message()).attributes[ATTR_REPLAY_COUNT] == value
    else:
        assert dl.replay_count == count and dl.attributes == {"origin": "a"}


@pytest.mark.parametrize(
    "attribute,value",
    [(ATTR_DELIVERY_ATTEMPT, "five"), (ATTR_DELIVERY_ATTEMPT, "0"), (ATTR_REPLAY_COUNT, "-2"), (ATTR_TIME, "yesterday"),
     (ATTR_TIME, "0001-01-01T00:00:00+14:00"), (ATTR_PARKED, "yes"), (ATTR_KIND, "robot"), (ATTR_KEPT, "half"),
     (ATTR_KEPT, KEPT_BODY_CUT), (ATTR_ENVELOPE, "1")],
)  # fmt: skip
def test_esp_letters_whose_attributes_do_not_read_are_listed_as_unreadable_never_raised(attribute: str, value: str) -> None:
    data, attrs = _letter({"origin": "a"}).to_message()
    dl = DeadLetter.from_pubsub(data, {**attrs, attribute: value})
    assert dl.error_type == UNREADABLE and "could not be read" in dl.reason and "model_rejected" in dl.reason
    assert dl.attributes == {"origin": "a"}
    if attribute in (ATTR_KEPT, ATTR_ENVELOPE):
        assert dl.kept == KEPT_DAMAGED and not dl.replayable


def test_naive_or_offset_times_read_as_utc() -> None:
    data, attrs = _letter({}).to_message()
    dl = DeadLetter.from_pubsub(data, {**attrs, ATTR_TIME: "2026-01-02T03:04:05"})
    assert dl.time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    dl = DeadLetter.from_pubsub(data, {**attrs, ATTR_TIME: "2026-01-02T05:04:05+02:00"})
    assert dl.time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------------------------------------
# The dead letter always fits: Pub/Sub's 10 MB, 100 attributes, 256-byte keys, 1,024-byte values.


def _protobuf_bytes(data: bytes, attrs: dict[str, str], topic: str) -> int:
    """What the Python client checks against 10,000,000 bytes: the publish request's own size."""
    from google.pubsub_v1.types import PublishRequest, PubsubMessage

    request = PublishRequest(topic=topic, messages=[PubsubMessage(data=data, attributes=attrs)])
    return PublishRequest.pb(request).ByteSize()


def test_the_size_estimate_is_protobufs_own() -> None:
    cases = [(b"", {"": ""}), (b"x" * 300, {"k" * 256: "v" * 1024}), (b"y" * 20_000_000, {f"k{i}": "é" * 300 for i in range(100)})]
    for data, attrs in cases:
        assert pubsub_message_bytes(data, attrs) == _protobuf_bytes(data, attrs, "") - _protobuf_bytes(b"", {}, "") + 2


def _fits(data: bytes, attrs: dict[str, str]) -> None:
    longest_topic = "projects/" + "p" * 30 + "/topics/" + "t" * 255
    assert _protobuf_bytes(data, attrs, longest_topic) <= MAX_PUBLISH_REQUEST_BYTES
    assert len(attrs) <= MAX_ATTRIBUTES
    assert all(0 < len(k.encode()) <= MAX_ATTRIBUTE_KEY_BYTES and len(v.encode()) <= MAX_ATTRIBUTE_VALUE_BYTES for k, v in attrs.items())


def test_a_body_that_fits_stays_whole() -> None:
    body = b"b" * 9_990_000
    data, attrs = _letter({"origin": "a"}, body=body).to_message()
    _fits(data, attrs)
    assert data == body and ATTR_KEPT not in attrs


def test_a_body_too_large_to_fit_is_cut_with_its_digest_size_and_marker() -> None:
    body = bytes(range(256)) * (10_000_000 // 256)  # 9,999,872 bytes: fits alone, not with ESP's attributes
    crowded = {f"attribute-{i:02d}": "v" * 1000 for i in range(80)}
    data, attrs = _letter(crowded, body=body, reason="é" * 2000).to_message()
    _fits(data, attrs)
    assert attrs[ATTR_KEPT] == KEPT_BODY_CUT and attrs[ATTR_BODY_BYTES] == str(len(body))
    assert attrs[ATTR_BODY_SHA256] == hashlib.sha256(body).hexdigest()
    back = DeadLetter.from_pubsub(data, attrs)
    assert back.kept == KEPT_BODY_CUT and not back.replayable and body.startswith(back.data)
    assert len(back.data) > 9_800_000 and back.attributes == crowded
    note = back.kept_note() or ""
    assert "body not kept" in note and str(len(body)) in note and attrs[ATTR_BODY_SHA256] in note


def test_attributes_that_cannot_all_be_attributes_travel_in_an_envelope() -> None:
    full = {f"k{i:03d}": "v" * 1024 for i in range(MAX_ATTRIBUTES)}  # Pub/Sub's maximum, all of it
    long_name = {"esp_" + "n" * 250: "renamed it would be 263 bytes", "origin": "a"}
    for original in (full, long_name):
        letter = _letter(original, ordering_key="user-1")
        data, attrs = letter.to_message()
        _fits(data, attrs)
        assert attrs[ATTR_ENVELOPE] == "1" and data.startswith(ENVELOPE_MAGIC) and data.endswith(letter.data)
        back = DeadLetter.from_pubsub(data, attrs)
        assert (back.attributes, back.data, back.ordering_key, back.kept) == (original, letter.data, "user-1", KEPT_WHOLE)
    # Both at once: envelope and a body cut to fit.
    data, attrs = _letter(full, body=b"z" * 9_999_000).to_message()
    _fits(data, attrs)
    back = DeadLetter.from_pubsub(data, attrs)
    assert back.attributes == full and back.kept == KEPT_BODY_CUT and back.body_bytes == 9_999_000


@settings(max_examples=examples(100), deadline=None)
@given(st.text(min_size=1, max_size=3000), st.integers(min_value=64, max_value=20_000))
def test_fields_are_refused_for_size_exactly_when_their_json_body_is_too_large(text: str, limit: int) -> None:
    # comment_from_fields skips encoding when a bound says the body must fit: the bound may never be wrong.
    try:
        comment = comment_from_fields("an-id", text, max_body_bytes=limit)
    except InvalidComment as exc:
        if exc.error_type == ErrorType.BODY_TOO_LARGE:
            assert len(Comment("an-id", text).to_json_bytes()) > limit
        return
    assert len(comment.to_json_bytes()) <= limit
