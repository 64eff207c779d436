"""Property-based tests of the worker's intake and the backfill's readers (JSONL lines, BigQuery
rows): whatever a producer sends, nothing raises out, every rejection carries its type and reason,
everything accepted can be scored, encoded and published, and every dead letter fits Pub/Sub.

Bounded for the suite (a few seconds). For a run 200 times longer (tests/fixtures/fuzz.py):
    .venv/bin/pytest tests/test_intake_fuzz.py --hypothesis-profile=esp-fuzz-long --timeout=0
"""

from __future__ import annotations

import datetime as dt
import json

from google.pubsub_v1.types import PubsubMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp.contracts import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    Comment,
    ErrorType,
    InvalidComment,
    Score,
    Stage,
    dead_letter_for,
)
from esp.scoring import Canary, Scored, score_isolating
from tests.fixtures.fuzz import examples
from tests.fixtures.worker import SumScorer
from worker.service import read_comment

FUZZ = settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
ERROR_TYPES = {v for k, v in vars(ErrorType).items() if k.isupper()}

# Text of every kind, lone surrogates and control characters included.
ANY_TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=200) | st.text(
    alphabet=st.characters(categories=["Cs", "Cc", "Zs", "Mn", "So"]), max_size=50
)
JSON_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | ANY_TEXT
JSON_VALUE = st.recursive(
    JSON_SCALAR, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_TEXT, inner, max_size=5), max_leaves=20
)


def encode(value: object) -> bytes:
    # ensure_ascii keeps lone surrogates as \\udXXX escapes: valid JSON that decodes to a str UTF-8 cannot carry.
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")


BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON_VALUE.map(encode),
    st.fixed_dictionaries({"id": JSON_VALUE, "text": JSON_VALUE}, optional={"extra": JSON_VALUE}).map(encode),
    st.fixed_dictionaries({"id": ANY_TEXT, "text": ANY_TEXT}).map(encode),
    st.integers(min_value=1, max_value=60_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=20_000).map(lambda n: b'{"id": "a", "text": "b", "n": ' + b"7" * n + b"}"),
    st.integers(min_value=1, max_value=5_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)
# What Pub/Sub can deliver: at most 100 attributes, UTF-8 keys of 1..256 bytes, values up to 1,024 bytes.
PUBSUB_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
ATTRIBUTES = st.dictionaries(
    PUBSUB_TEXT.filter(lambda k: 0 < len(k.encode("utf-8")) <= 256),
    PUBSUB_TEXT.filter(lambda v: len(v.encode("utf-8")) <= MAX_ATTRIBUTE_VALUE_BYTES),
    max_size=MAX_ATTRIBUTES,
)


def message(data: bytes) -> PubsubMessage:
    return PubsubMessage.pb()(data=data, message_id="fuzz-1")


@FUZZ
@given(BODIES)
def test_intake_never_raises_and_every_rejection_has_a_reason(body: bytes) -> None:
    try:
        comment = read_comment(message(body), max_body_bytes=DEFAULT_MAX_BODY_BYTES)
    except InvalidComment as exc:
        assert exc.error_type in ERROR_TYPES and exc.error_type != ErrorType.INTERNAL_ERROR
        assert exc.reason.strip()
        return
    # What is accepted can go all the way: encoded for the model, scored, encoded as a score.
    comment.text.encode("utf-8")
    comment.id.encode("utf-8")
    (outcome,) = score_isolating(SumScorer(), [comment], canary=Canary(SumScorer()))
    assert isinstance(outcome, Scored)
    json.loads(outcome.score.to_json_bytes())


@FUZZ
@given(ANY_TEXT, ANY_TEXT)
def test_a_score_for_any_accepted_comment_encodes(cid: str, text: str) -> None:
    try:
        comment = read_comment(message(encode({"id": cid, "text": text})), max_body_bytes=DEFAULT_MAX_BODY_BYTES)
    except InvalidComment:
        return
    score = Score(comment.id, {"toxic": 0.5}, {"toxic": 0.5}, "m", 1, False, dt.datetime.now(dt.timezone.utc))
    assert json.loads(score.to_json_bytes())["id"] == comment.id


@FUZZ
@given(st.binary(max_size=500), ATTRIBUTES, ANY_TEXT)
def test_a_dead_letter_is_built_for_any_message_and_fits_pubsub(body: bytes, attributes: dict[str, str], reason: str) -> None:
    letter = dead_letter_for(
        body, attributes, stage=Stage.VALIDATE, error_type=ErrorType.INVALID_JSON, reason=reason or "why", worker="w"
    )
    attrs = letter.to_attributes()
    assert len(attrs) <= MAX_ATTRIBUTES
    for key, value in attrs.items():
        assert len(key.encode("utf-8")) <= 256
        assert len(value.encode("utf-8")) <= MAX_ATTRIBUTE_VALUE_BYTES
    assert letter.data == body


def test_the_fuzzer_reaches_the_cases_that_once_stopped_a_worker() -> None:
    # The bodies of issue 9, checked directly so a weaker strategy cannot silently skip them.
    for body in (b'{"id": "a", "text": "b", "n": ' + b"9" * 5000 + b"}", b'{"a":' * 3000 + b"1" + b"}" * 3000):
        try:
            read_comment(message(body), max_body_bytes=DEFAULT_MAX_BODY_BYTES)
        except InvalidComment as exc:
            assert exc.error_type == ErrorType.INVALID_JSON
        else:
            raise AssertionError("accepted a body that is no comment")
    assert Comment("a", "b").to_json_bytes()


# ---------------------------------------------------------------------------------------------
# The backfill's readers: a JSONL line, and a BigQuery row (whatever its columns hold).

ROW_VALUE = JSON_VALUE | st.binary(max_size=50) | st.datetimes() | st.decimals(allow_nan=True)


def _backfill_outputs(dofn: object, element: object) -> list[object]:
    dofn.setup()
    return list(dofn.process(element))


def _check_backfill_outputs(outputs: list[object]) -> None:
    import apache_beam as beam

    from beam_jobs.backfill import DEAD_LETTERS

    assert len(outputs) <= 1
    for out in outputs:
        if isinstance(out, Comment):
            Score(out.id, {"toxic": 0.5}, {"toxic": 0.5}, "m", 1, False, dt.datetime.now(dt.timezone.utc)).to_json_bytes()
            continue
        assert isinstance(out, beam.pvalue.TaggedOutput) and out.tag == DEAD_LETTERS
        row = out.value
        assert row.error_type in ERROR_TYPES and row.reason
        json.loads(row.to_json_line())
        json.dumps(row.to_row("run-1", "fuzz"), default=str)


@FUZZ
@given(BODIES)
def test_the_backfills_line_reader_never_raises(body: bytes) -> None:
    from beam_jobs.backfill import ValidateLine

    _check_backfill_outputs(_backfill_outputs(ValidateLine(DEFAULT_MAX_BODY_BYTES, 3600.0), body))


@FUZZ
@given(st.fixed_dictionaries({"id": ROW_VALUE, "text": ROW_VALUE}))
def test_the_backfills_bigquery_row_reader_never_raises(row: dict) -> None:
    from beam_jobs.backfill import ValidateRow

    _check_backfill_outputs(_backfill_outputs(ValidateRow(DEFAULT_MAX_BODY_BYTES, 3600.0), row))


def test_the_backfills_line_reader_drops_a_files_byte_order_mark_and_nothing_else() -> None:
    from beam_jobs.backfill import ValidateLine

    reader = ValidateLine(DEFAULT_MAX_BODY_BYTES, 3600.0)
    [comment] = _backfill_outputs(reader, b'\xef\xbb\xbf{"id": "a", "text": "first line"}')
    assert comment == Comment("a", "first line")
    assert _backfill_outputs(reader, b"\xef\xbb\xbf \n") == []
    [dead] = _backfill_outputs(reader, b'\xef\xbb\xbf\xef\xbb\xbf{"id": "a", "text": "t"}')  # only one mark is the file's
    assert dead.value.error_type == "invalid_json"
