"""Fuzzing the dead-letter readers and writer: whatever a letter's body and attributes are, nothing
raises, a producer cannot forge ESP's verdict, and `to_message()` always fits Pub/Sub and reads back.

Bounded for the suite (a few seconds in all). A longer run (200 times the examples, see tests/fixtures/fuzz.py):
    .venv/bin/pytest tests/test_fuzz_dead_letters.py -q --hypothesis-profile=esp-fuzz-long --timeout=0
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp.contracts import (
    ATTR_BODY_SHA256,
    ATTR_ERROR_TYPE,
    ATTR_KEPT,
    ATTR_PARKED,
    ATTR_REASON,
    ATTR_REPLAY_COUNT,
    ATTR_STAGE,
    ATTR_TIME,
    ENVELOPE_MAGIC,
    KEPT,
    KEPT_BODY_CUT,
    KEPT_WHOLE,
    KIND_POLICY,
    KINDS,
    MAX_ATTRIBUTE_KEY_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    POLICY_DELIVERY_COUNT,
    POLICY_REASON,
    DeadLetter,
    clip_utf8,
    dead_letter_for,
    parse_replay_count,
    pubsub_message_bytes,
)
from esp.dead_letters import Filter, Letter, Stats, format_letter, format_stats, format_table, record_data
from tests.fixtures.fuzz import examples

# What Pub/Sub can deliver: valid Unicode (no lone surrogates) within its size limits.
wire_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
INTERESTING_KEYS = [
    ATTR_STAGE, ATTR_ERROR_TYPE, ATTR_REASON, ATTR_PARKED, ATTR_REPLAY_COUNT, ATTR_TIME, ATTR_KEPT,
    ATTR_BODY_SHA256, "esp_envelope", "esp_kind", "esp_delivery_attempt", "esp_body_bytes", "esp_ordering_key",
    "esp_orig.esp_parked", "esp_orig.x", "esp_", POLICY_DELIVERY_COUNT, "CloudPubSubDeadLetterSourceSubscription",
    "timeout", "data", "topic", "retry", "self", "ordering_key", "origin", "esp_" + "k" * 250, "é" * 128,
]  # fmt: skip
INTERESTING_VALUES = [
    "true", "false", "TRUE", "0", "1", "3", "1000", "1001", "-1", "03", " 3", "3.0", "٣", "1e3", "five", "",
    "2024-05-01T12:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2024-13-45", "worker",
    "policy", "unknown", "body_cut", "damaged", "whole", "a" * 64, "\x1b[2J\x1b[31mred", "\u202etxt.exe", "\x00\x07",
    "x" * MAX_ATTRIBUTE_VALUE_BYTES, "é" * 512,
]  # fmt: skip
keys = st.sampled_from(INTERESTING_KEYS) | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
values = st.sampled_from(INTERESTING_VALUES) | wire_text
few = st.dictionaries(keys, values, max_size=8)
# Crowded: close to Pub/Sub's 100 attributes, so ESP's own no longer fit beside them.
crowded = st.tuples(st.integers(85, MAX_ATTRIBUTES), few).map(
    lambda t: dict(list({**{f"k{i:03d}": "v" for i in range(t[0])}, **t[1]}.items())[:MAX_ATTRIBUTES])
)
attributes = few | crowded
bodies = st.binary(max_size=300) | st.sampled_from(
    [b"", b"{}", b'{"id": "c-1", "text": "hi"}', b'{"id": 1e999}', b"[" * 5000, ENVELOPE_MAGIC, ENVELOPE_MAGIC + b"{}\n",
     ENVELOPE_MAGIC + b'{"attributes": {"a": 1}}\nbody', ENVELOPE_MAGIC + b"[" * 5000 + b"\n", b"\xff\xfe\x00"]
)  # fmt: skip
times = st.datetimes(timezones=st.just(dt.timezone.utc))


def received(
    data: bytes, attrs: dict[str, str], ordering_key: str = "", when: dt.datetime | None = None, message_id: str = "m-1"
) -> Any:
    """A real ReceivedMessage, as a pull returns it."""
    from google.pubsub_v1.types import PubsubMessage, ReceivedMessage

    message = PubsubMessage(
        data=data,
        attributes=attrs,
        message_id=message_id,
        publish_time=when or dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc),
        ordering_key=ordering_key,
    )
    return ReceivedMessage(ack_id="ack-1", message=message, delivery_attempt=1)


def assert_printable(lines: list[str]) -> None:
    for line in lines:
        assert line.isprintable(), repr(line)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, attributes, wire_text, times)
def test_any_letter_reads_and_every_verb_handles_it(data: bytes, attrs: dict[str, str], ordering_key: str, when: dt.datetime) -> None:
    letter = Letter.from_received(received(data, attrs, ordering_key, when))
    d = letter.dead_letter
    assert d.kind in KINDS and d.kept in KEPT and d.stage and d.error_type
    if any(k.startswith("CloudPubSubDeadLetterSource") for k in attrs):
        # A policy letter's esp_* attributes are the producer's: never a verdict.
        assert (d.kind, d.reason, d.parked) == (KIND_POLICY, POLICY_REASON, False)
    row = letter.classification()
    json.dumps(row)
    record = json.loads(json.dumps(letter.to_record(), ensure_ascii=False))
    assert record_data(record) == letter.body
    assert isinstance(Filter(reason_contains=("x",), since=when).matches(letter), bool)
    stats = Stats()
    stats.add(letter)
    assert_printable(format_table([row]) + format_letter(letter) + format_stats(stats))
    if d.replayable:
        # What a replay would send: the parked copy, too, always fits and reads back the same.
        parked = DeadLetter.from_pubsub(*dataclasses.replace(d, parked=True).to_message())
        assert parked.parked and parked.attributes == d.attributes and parked.data == d.data


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, attributes, st.sampled_from(["validate", "score"]), wire_text, wire_text)
def test_a_producer_cannot_forge_the_verdict_and_loses_nothing(
    data: bytes, attrs: dict[str, str], stage: str, reason: str, ordering_key: str
) -> None:
    letter = dead_letter_for(
        data, attrs, stage=stage, error_type="model_rejected", reason=reason, worker="w-1",
        delivery_attempt=5, source_message_id="src-1", ordering_key=ordering_key,
    )  # fmt: skip
    back = DeadLetter.from_pubsub(*letter.to_message())
    replay_count = parse_replay_count(attrs.get(ATTR_REPLAY_COUNT))
    expected = dict(attrs)
    if replay_count is not None:
        del expected[ATTR_REPLAY_COUNT]
    assert (back.stage, back.error_type, back.reason, back.parked) == (stage, "model_rejected", clip_utf8(reason), False)
    assert (back.replay_count, back.attributes, back.data, back.kept) == (replay_count or 0, expected, data, KEPT_WHOLE)
    assert back.ordering_key == ordering_key
    # The same comment forwarded by Pub/Sub's policy instead: its esp_* attributes stay its own
    # (its own CloudPubSubDeadLetterSource* ones cannot be told from Pub/Sub's there).
    policy = DeadLetter.from_pubsub(data, {**attrs, POLICY_DELIVERY_COUNT: "5"})
    own = {k: v for k, v in expected.items() if not k.startswith("CloudPubSubDeadLetterSource")}
    assert (policy.kind, policy.parked, policy.reason, policy.attributes) == (KIND_POLICY, False, POLICY_REASON, own)


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.integers(0, 400_000),
    attributes,
    wire_text,
    st.booleans(),
    st.integers(150_000, 300_000),
)
def test_to_message_always_fits_and_reads_back(body_size: int, attrs: dict[str, str], reason: str, parked: bool, max_bytes: int) -> None:
    body = hashlib.sha256(str(body_size).encode()).digest() * (body_size // 32) + b"z" * (body_size % 32)
    letter = dataclasses.replace(
        dead_letter_for(body, attrs, stage="validate", error_type="body_too_large", reason=reason, worker="w"), parked=parked
    )
    data, wire = letter.to_message(max_bytes=max_bytes)
    assert pubsub_message_bytes(data, wire) <= max_bytes
    assert len(wire) <= MAX_ATTRIBUTES
    for k, v in wire.items():
        assert 1 <= len(k.encode()) <= MAX_ATTRIBUTE_KEY_BYTES and not k.startswith("goog")
        assert len(v.encode()) <= MAX_ATTRIBUTE_VALUE_BYTES
    back = DeadLetter.from_pubsub(data, wire)
    assert back.attributes == letter.attributes and back.parked == parked and back.error_type == "body_too_large"
    if back.kept == KEPT_WHOLE:
        assert back.data == body
    else:
        assert back.kept == KEPT_BODY_CUT and body.startswith(back.data)
        assert (back.body_sha256, back.body_bytes) == (hashlib.sha256(body).hexdigest(), len(body))
        # Parked again (or read and written again), a cut letter still describes the whole body.
        again = DeadLetter.from_pubsub(*back.to_message(max_bytes=max_bytes))
        assert (again.body_sha256, again.body_bytes, again.data) == (back.body_sha256, back.body_bytes, back.data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | wire_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(wire_text, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=examples(200), deadline=None)
@given(json_values | st.fixed_dictionaries({"data": json_values, "data_encoding": json_values}))
def test_record_data_returns_bytes_or_says_why(record: Any) -> None:
    try:
        assert isinstance(record_data(record), bytes)
    except ValueError as exc:
        assert str(exc)
