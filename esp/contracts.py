"""ESP's wire contracts: the comment (in), the score (out) and the dead letter.

Everything that reads or writes Pub/Sub messages or score records (the worker, the Beam jobs, the
CLI) goes through this module, so a rule lives in exactly one place. docs/contracts.md documents
each contract with an example; the error types below are the values of the `esp_error_type`
attribute on dead letters.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

SCHEMA_VERSION = "1"

# A comment body over this many bytes is poison. 64 KiB holds any real comment many times over
# (Jigsaw's longest is about 5,000 characters) while bounding what one message can cost a worker.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
MAX_ID_CHARS = 256

# Pub/Sub limits an attribute value to 1,024 bytes and a message to 100 attributes.
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_ATTRIBUTES = 100


class ErrorType:
    """Why a comment could not be scored: the `esp_error_type` of its dead letter."""

    INVALID_UTF8 = "invalid_utf8"
    BODY_TOO_LARGE = "body_too_large"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_ID = "missing_id"
    INVALID_ID = "invalid_id"
    MISSING_TEXT = "missing_text"
    NON_STRING_TEXT = "non_string_text"
    EMPTY_TEXT = "empty_text"
    # A string field that is not valid Unicode text (a lone surrogate from a \ud800 escape, say):
    # the model client and the score encoder must send it as UTF-8 and could not.
    UNENCODABLE_TEXT = "unencodable_text"
    # Raised by the model, not by validation: the model server refused this one comment, even alone
    # and while a known-good canary passed.
    MODEL_REJECTED = "model_rejected"
    # The model answered for this comment, alone, with a probability that is NaN, infinite or
    # outside [0, 1], while the canary's answers were fine.
    MODEL_OUTPUT_INVALID = "model_output_invalid"
    # Scoring this comment alone raised something unexpected (not a rejection, not an outage),
    # while the canary passed.
    MODEL_ERROR = "model_error"
    # Pub/Sub refused the score of this comment (INVALID_ARGUMENT), even in a request of its own.
    SCORE_PUBLISH_REFUSED = "score_publish_refused"
    # An unexpected error in ESP while handling this one message; the reason names it. The message
    # is set aside rather than allowed to stop a worker thread.
    INTERNAL_ERROR = "internal_error"


class Stage:
    """Where in ESP a message failed: the `esp_stage` of its dead letter."""

    VALIDATE = "validate"
    SCORE = "score"
    PUBLISH = "publish"


class InvalidComment(ValueError):
    """A comment that breaks the contract; `error_type` is one of ErrorType's values."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# The comment (in)


@dataclasses.dataclass(frozen=True)
class Comment:
    """A valid comment: a non-empty string id and non-blank text."""

    id: str
    text: str

    def to_json_bytes(self) -> bytes:
        return json.dumps({"id": self.id, "text": self.text}, ensure_ascii=False).encode("utf-8")


def _unencodable_at(value: str) -> int | None:
    """Index of the first character UTF-8 cannot carry (a lone surrogate), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _control_char(value: str) -> str | None:
    for ch in value:
        if ch < " " or "\x7f" <= ch <= "\x9f":
            return ch
    return None


def _check_fields(obj: Any) -> Comment:
    if not isinstance(obj, dict):
        raise InvalidComment(ErrorType.NOT_AN_OBJECT, f"body must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj or obj["id"] is None:
        raise InvalidComment(ErrorType.MISSING_ID, "no 'id' field")
    cid = obj["id"]
    if not isinstance(cid, str):
        raise InvalidComment(ErrorType.INVALID_ID, f"'id' must be a string, got {type(cid).__name__}")
    if not cid.strip():
        raise InvalidComment(ErrorType.INVALID_ID, "'id' is empty")
    if len(cid) > MAX_ID_CHARS:
        raise InvalidComment(ErrorType.INVALID_ID, f"'id' has {len(cid)} characters, the limit is {MAX_ID_CHARS}")
    bad_at = _unencodable_at(cid)
    if bad_at is not None:
        raise InvalidComment(
            ErrorType.UNENCODABLE_TEXT, f"'id' is not valid Unicode: lone surrogate U+{ord(cid[bad_at]):04X} at character {bad_at}"
        )
    # Ids travel into log lines, attributes, file names of exports and warehouse keys: a newline or
    # an escape sequence in one is an injection, never an identifier.
    ctrl = _control_char(cid)
    if ctrl is not None:
        raise InvalidComment(ErrorType.INVALID_ID, f"'id' contains the control character U+{ord(ctrl):04X}")
    if "text" not in obj or obj["text"] is None:
        raise InvalidComment(ErrorType.MISSING_TEXT, "no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise InvalidComment(ErrorType.NON_STRING_TEXT, f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidComment(ErrorType.EMPTY_TEXT, "'text' is empty or only whitespace")
    bad_at = _unencodable_at(text)
    if bad_at is not None:
        raise InvalidComment(
            ErrorType.UNENCODABLE_TEXT,
            f"'text' is not valid Unicode: lone surrogate U+{ord(text[bad_at]):04X} at character {bad_at}",
        )
    return Comment(id=cid, text=text)


def parse_comment(body: bytes, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Comment:
    """Validates a message body against the comment contract; raises InvalidComment with the reason."""
    if len(body) > max_body_bytes:
        raise InvalidComment(
            ErrorType.BODY_TOO_LARGE, f"body is {len(body)} bytes, the limit is {max_body_bytes}"
        )
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidComment(ErrorType.INVALID_UTF8, f"body is not valid UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise InvalidComment(
            ErrorType.INVALID_JSON, f"body is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        # Valid JSON nested deeper than the parser's stack: `[[[[...]]]]` in a few kilobytes.
        raise InvalidComment(ErrorType.INVALID_JSON, "body is JSON nested too deeply to read") from None
    except ValueError as exc:
        # Valid JSON the parser still refuses, e.g. an integer of more than 4,300 digits
        # (CPython's int conversion limit): not a JSONDecodeError, and never a comment.
        raise InvalidComment(ErrorType.INVALID_JSON, f"body is not readable JSON: {str(exc)[:200]}") from None
    return _check_fields(obj)


def comment_from_fields(cid: Any, text: Any, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Comment:
    """Validates a comment that came as fields (a CSV row, a BigQuery row) rather than bytes."""
    comment = _check_fields({"id": cid, "text": text})
    size = len(comment.to_json_bytes())
    if size > max_body_bytes:
        raise InvalidComment(ErrorType.BODY_TOO_LARGE, f"body would be {size} bytes, the limit is {max_body_bytes}")
    return comment


# ---------------------------------------------------------------------------------------------
# The score (out)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class Score:
    """The score of one comment under one model version.

    `probabilities` has one entry per label the model declares; `flags` lists the labels whose
    probability reached the model's own threshold for that label. Consumers dedupe on
    (`id`, `model_version`): delivery is at least once.
    """

    id: str
    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float]
    model_name: str
    model_version: int
    truncated: bool
    scored_at: dt.datetime
    published_at: dt.datetime | None = None

    @property
    def flags(self) -> list[str]:
        return [label for label, p in self.probabilities.items() if p >= self.thresholds.get(label, math.inf)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "id": self.id,
            "scores": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "flags": self.flags,
            "truncated": self.truncated,
            "model": {"name": self.model_name, "version": self.model_version},
            "published_at": rfc3339(self.published_at) if self.published_at else None,
            "scored_at": rfc3339(self.scored_at),
        }

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def attributes(self) -> dict[str, str]:
        """Discrete attributes for subscription filters (e.g. `attributes.flagged = "true"`)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model_name": self.model_name,
            "model_version": str(self.model_version),
            "flagged": "true" if self.flags else "false",
            "truncated": "true" if self.truncated else "false",
        }


def parse_score(body: bytes) -> dict[str, Any]:
    """Reads a score message back (consumers, tests, the demo); checks the schema version."""
    record = json.loads(body)
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported score schema_version {record.get('schema_version')!r}")
    return record


# ---------------------------------------------------------------------------------------------
# The dead letter

ATTR_PREFIX = "esp_"
ATTR_STAGE = "esp_stage"
ATTR_ERROR_TYPE = "esp_error_type"
ATTR_REASON = "esp_reason"
ATTR_WORKER = "esp_worker"
ATTR_TIME = "esp_time"
ATTR_DELIVERY_ATTEMPT = "esp_delivery_attempt"
ATTR_SOURCE_MESSAGE_ID = "esp_source_message_id"
ATTR_SOURCE_SUBSCRIPTION = "esp_source_subscription"
ATTR_REPLAY_COUNT = "esp_replay_count"
# The comment's own ordering key. Kept as an attribute because publishing the dead letter with the
# key itself would need ordered publishing on the dead-letter topic, where order means nothing.
ATTR_ORDERING_KEY = "esp_ordering_key"
ATTR_PARKED = "esp_parked"
# Added by Pub/Sub itself when its dead-letter policy forwards a message.
POLICY_ATTR_PREFIX = "CloudPubSubDeadLetterSource"
POLICY_DELIVERY_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
POLICY_SOURCE_SUBSCRIPTION = "CloudPubSubDeadLetterSourceSubscription"

# The reason ESP wrote, versus Pub/Sub's own forwarding after max delivery attempts.
KIND_WORKER = "worker"
KIND_POLICY = "policy"
POLICY_REASON = "forwarded by policy, no reason recorded"


def clip_utf8(value: str, limit: int = MAX_ATTRIBUTE_VALUE_BYTES) -> str:
    """Cuts a string to at most `limit` UTF-8 bytes without splitting a character."""
    # "replace": a lone surrogate (from an exception that quoted the input, say) becomes "?", since
    # an attribute must be UTF-8.
    raw = value.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    cut = raw[: limit - 3].decode("utf-8", errors="ignore")
    return cut + "..."


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message ESP could not score, with why; the one type the worker writes and replay reads.

    `data` is the original message body, byte for byte, and `attributes` its original attributes
    (without any `esp_*` ones), so it can be republished exactly as it came.
    """

    data: bytes
    attributes: Mapping[str, str]
    stage: str
    error_type: str
    reason: str
    worker: str
    time: dt.datetime
    delivery_attempt: int | None = None
    source_message_id: str | None = None
    source_subscription: str | None = None
    ordering_key: str = ""
    replay_count: int = 0
    parked: bool = False
    kind: str = KIND_WORKER

    def to_attributes(self) -> dict[str, str]:
        esp = {
            ATTR_STAGE: self.stage,
            ATTR_ERROR_TYPE: self.error_type,
            ATTR_REASON: self.reason,
            ATTR_WORKER: self.worker,
            ATTR_TIME: rfc3339(self.time),
        }
        if self.delivery_attempt is not None:
            esp[ATTR_DELIVERY_ATTEMPT] = str(self.delivery_attempt)
        if self.source_message_id:
            esp[ATTR_SOURCE_MESSAGE_ID] = self.source_message_id
        if self.source_subscription:
            esp[ATTR_SOURCE_SUBSCRIPTION] = self.source_subscription
        if self.replay_count:
            esp[ATTR_REPLAY_COUNT] = str(self.replay_count)
        if self.parked:
            esp[ATTR_PARKED] = "true"
        if self.ordering_key:
            esp[ATTR_ORDERING_KEY] = self.ordering_key
        original = {k: v for k, v in self.attributes.items() if not k.startswith(ATTR_PREFIX)}
        # Keep ours when the original message already used (nearly) all 100 attribute slots.
        room = MAX_ATTRIBUTES - len(esp)
        original = dict(list(original.items())[:room])
        return {**original, **{k: clip_utf8(v) for k, v in esp.items()}}

    @classmethod
    def from_pubsub(
        cls, data: bytes, attributes: Mapping[str, str], *, publish_time: dt.datetime | None = None, ordering_key: str = ""
    ) -> DeadLetter:
        """Reads a message from the dead-letter topic: the worker's own, or one the policy forwarded."""
        attrs = dict(attributes)
        ordering_key = ordering_key or attrs.get(ATTR_ORDERING_KEY, "")
        original = {
            k: v for k, v in attrs.items() if not k.startswith(ATTR_PREFIX) and not k.startswith(POLICY_ATTR_PREFIX)
        }
        replay_count = int(attrs.get(ATTR_REPLAY_COUNT, "0") or 0)
        parked = attrs.get(ATTR_PARKED) == "true"
        if ATTR_ERROR_TYPE in attrs:
            attempt = attrs.get(ATTR_DELIVERY_ATTEMPT)
            return cls(
                data=data,
                attributes=original,
                stage=attrs.get(ATTR_STAGE, "unknown"),
                error_type=attrs[ATTR_ERROR_TYPE],
                reason=attrs.get(ATTR_REASON, ""),
                worker=attrs.get(ATTR_WORKER, ""),
                time=_parse_time(attrs.get(ATTR_TIME)) or publish_time or utc_now(),
                delivery_attempt=int(attempt) if attempt else None,
                source_message_id=attrs.get(ATTR_SOURCE_MESSAGE_ID),
                source_subscription=attrs.get(ATTR_SOURCE_SUBSCRIPTION),
                ordering_key=ordering_key,
                replay_count=replay_count,
                parked=parked,
                kind=KIND_WORKER,
            )
        count = attrs.get(POLICY_DELIVERY_COUNT)
        return cls(
            data=data,
            attributes=original,
            stage="unknown",
            error_type="max_delivery_attempts",
            reason=POLICY_REASON,
            worker="",
            time=publish_time or utc_now(),
            delivery_attempt=int(count) if count else None,
            source_subscription=attrs.get(POLICY_SOURCE_SUBSCRIPTION),
            ordering_key=ordering_key,
            replay_count=replay_count,
            parked=parked,
            kind=KIND_POLICY,
        )


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def dead_letter_for(
    data: bytes,
    attributes: Mapping[str, str],
    *,
    stage: str,
    error_type: str,
    reason: str,
    worker: str,
    delivery_attempt: int | None = None,
    source_message_id: str | None = None,
    source_subscription: str | None = None,
    ordering_key: str = "",
) -> DeadLetter:
    """A dead letter for a message that failed now; keeps any replay count the message carries."""
    replay = attributes.get(ATTR_REPLAY_COUNT, "0")
    return DeadLetter(
        data=data,
        attributes={k: v for k, v in attributes.items() if not k.startswith(ATTR_PREFIX)},
        stage=stage,
        error_type=error_type,
        reason=reason,
        worker=worker,
        time=utc_now(),
        delivery_attempt=delivery_attempt,
        source_message_id=source_message_id,
        source_subscription=source_subscription,
        ordering_key=ordering_key,
        replay_count=int(replay) if replay.isdigit() else 0,
    )


def labels_from_outputs(output_keys: Sequence[str]) -> list[str]:
    """The model contract: every signature output not prefixed `esp_` is a label's probability."""
    return sorted(k for k in output_keys if not k.startswith(ATTR_PREFIX))
