"""ESP's wire contracts: the comment (in), the score (out) and the dead letter.

Everything that reads or writes Pub/Sub messages or score records (the worker, the Beam jobs, the
CLI) goes through this module, so a rule lives in exactly one place. docs/contracts.md documents
each contract with an example; the error types below are the values of the `esp_error_type`
attribute on dead letters.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
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
    # The model server failed (INTERNAL or UNKNOWN: an op broke) on this comment, alone, while the
    # canary passed: an input that trips a bug of the model or the server.
    MODEL_SERVER_ERROR = "model_server_error"
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


class AmbiguousJson(ValueError):
    """JSON the standard leaves open to each reader: a repeated key, or NaN/Infinity (not JSON at all)."""


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: only then find which key it was
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise AmbiguousJson(f"key {key[:100]!r} appears more than once in one object")
            seen.add(key)
    return obj


def _not_a_number(name: str) -> Any:
    raise AmbiguousJson(f"{name} is not a JSON value")


def loads_json(data: str | bytes) -> Any:
    """JSON as every ESP intake reads it (the stream, `esp publish`, the backfill, the HTTP API).

    Stricter than `json.loads` in two ways, because a body two readers would read differently must
    not get a score: a repeated key (`{"text": "kind words", "text": "abuse"}`: Python keeps the
    last, other parsers the first, so a producer's own filter and ESP would judge different
    comments) and the non-standard NaN and Infinity are refused with AmbiguousJson. Other errors are
    the json module's: JSONDecodeError, RecursionError, ValueError (an integer too long to convert).
    """
    return json.loads(data, object_pairs_hook=_object_without_repeated_keys, parse_constant=_not_a_number)


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
        obj = loads_json(decoded)
    except AmbiguousJson as exc:
        raise InvalidComment(ErrorType.INVALID_JSON, f"body is ambiguous JSON: {exc}") from None
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


# `{"id": "", "text": ""}` and separators: what a comment's JSON body adds to its two strings.
_JSON_FRAME_BYTES = 32


def comment_from_fields(cid: Any, text: Any, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Comment:
    """Validates a comment that came as fields (a CSV row, a BigQuery row) rather than bytes."""
    comment = _check_fields({"id": cid, "text": text})
    # No character takes more than 6 bytes in the JSON body (a control character becomes \u001f;
    # others are at most 4 bytes of UTF-8): a comment of under a sixth of the limit in characters
    # fits without encoding it, which is nearly every comment.
    if 6 * (len(comment.id) + len(comment.text)) + _JSON_FRAME_BYTES <= max_body_bytes:
        return comment
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
#
# Whose attribute is whose (docs/contracts.md, "ESP's attributes are ESP's"):
# - Names starting `esp_` are ESP's. When ESP writes a dead letter (the worker) or parks one
#   (replay), a producer's own attribute named `esp_*` or `CloudPubSubDeadLetterSource*` is kept
#   under `esp_orig.<name>`: nothing the producer sent can pass for ESP's verdict, and nothing is
#   dropped. Readers restore the name, so a replay republishes exactly what the producer sent.
# - A dead letter's `esp_*` attributes are believed only when ESP wrote it: it carries
#   `esp_error_type` and no `CloudPubSubDeadLetterSource*` attribute. On a letter Pub/Sub's
#   dead-letter policy forwarded, every attribute but Pub/Sub's own is the comment's.
# - `esp_replay_count` is the one ESP attribute that travels on the comments topic (replay sets
#   it). It is read only as a plain decimal 0..1000; anything else is the producer's attribute.
# The dead-letter topic itself must be publishable only by the worker, Pub/Sub's service agent and
# operators (IAM): a dead letter's verdict is only as trustworthy as who may write there.

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
# Who first set the message aside, when it was not the worker (a parked policy letter): KINDS.
ATTR_KIND = "esp_kind"
# Absent when the letter holds the body and attributes whole; otherwise one of the KEPT_* values.
ATTR_KEPT = "esp_kept"
# With esp_kept=body_cut: the whole body's SHA-256 (hex) and size in bytes.
ATTR_BODY_SHA256 = "esp_body_sha256"
ATTR_BODY_BYTES = "esp_body_bytes"
# Set when the original attributes travel in the data, ahead of the body (see `to_message`).
ATTR_ENVELOPE = "esp_envelope"
# A producer's attribute in ESP's namespace, renamed: `esp_orig.esp_parked` was `esp_parked`.
ORIGINAL_PREFIX = "esp_orig."
# Attribute names the Python client's publish(topic, data, ordering_key=, retry=, timeout=, **attrs)
# cannot take as keyword arguments; renamed the same way, so a dead letter can go through it.
CLIENT_KEYWORDS = frozenset({"self", "topic", "data", "ordering_key", "retry", "timeout"})
# Added by Pub/Sub itself when its dead-letter policy forwards a message.
POLICY_ATTR_PREFIX = "CloudPubSubDeadLetterSource"
POLICY_DELIVERY_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
POLICY_SOURCE_SUBSCRIPTION = "CloudPubSubDeadLetterSourceSubscription"

# The reason ESP wrote, Pub/Sub's own forwarding after max delivery attempts, or neither (a message
# someone else put on the dead-letter topic).
KIND_WORKER = "worker"
KIND_POLICY = "policy"
KIND_UNKNOWN = "unknown"
KINDS = (KIND_WORKER, KIND_POLICY, KIND_UNKNOWN)
STAGE_UNKNOWN = "unknown"
POLICY_ERROR_TYPE = "max_delivery_attempts"
POLICY_REASON = "forwarded by policy, no reason recorded"
UNKNOWN_ERROR_TYPE = "unknown"
UNKNOWN_REASON = "neither written by ESP nor forwarded by Pub/Sub's dead-letter policy: no reason recorded"
# The error type of a letter ESP wrote whose esp_* attributes do not read back.
UNREADABLE = "unreadable_dead_letter"

# What a dead letter kept of the original message.
KEPT_WHOLE = "whole"  # body and attributes exactly as the producer sent them
KEPT_BODY_CUT = "body_cut"  # only the body's first bytes: it did not fit next to ESP's attributes
KEPT_DAMAGED = "damaged"  # the letter does not read back whole; it cannot be replayed as sent
KEPT = (KEPT_WHOLE, KEPT_BODY_CUT, KEPT_DAMAGED)

# Pub/Sub's limits: attribute keys of at most 256 bytes not starting with "goog", and a publish
# request of at most 10,000,000 bytes. A dead letter keeps 512 bytes of that for the request's own
# topic path (at most "projects/" + 30 + "/topics/" + 255 bytes) and framing.
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_PUBLISH_REQUEST_BYTES = 10_000_000
MAX_DEAD_LETTER_BYTES = MAX_PUBLISH_REQUEST_BYTES - 512
MAX_REPLAY_COUNT = 1000
# The data of a dead letter whose original attributes could not all be attributes: this line, one
# line of JSON (ASCII) with the attributes, then the body byte for byte.
ENVELOPE_MAGIC = b"ESP-DEAD-LETTER/1\n"
# Room for esp_kept, esp_body_sha256 and esp_body_bytes, should the body have to be cut.
_CUT_ATTRIBUTES = 3


def clip_utf8(value: str, limit: int = MAX_ATTRIBUTE_VALUE_BYTES) -> str:
    """Cuts a string to at most `limit` UTF-8 bytes without splitting a character.

    ESP's own texts only (reasons, names); a character UTF-8 cannot carry becomes '?'.
    """
    raw = value.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[: limit - 3].decode("utf-8", errors="ignore") + "..."


def in_esp_namespace(key: str) -> bool:
    """Attribute names that only ESP (`esp_*`) or Pub/Sub's dead-letter policy may set on a dead letter."""
    return key.startswith(ATTR_PREFIX) or key.startswith(POLICY_ATTR_PREFIX)


def _plain_decimal(value: str | None, max_digits: int) -> int | None:
    """A non-negative integer written as ESP writes one (ASCII digits, no sign, no leading zero)."""
    if value is None or not (1 <= len(value) <= max_digits and value.isascii() and value.isdigit()):
        return None
    if len(value) > 1 and value[0] == "0":
        return None
    return int(value)


def parse_replay_count(value: str | None) -> int | None:
    """`esp_replay_count` as ESP writes it, a plain decimal 0..1000; None for anything else."""
    count = _plain_decimal(value, 4)
    return count if count is not None and count <= MAX_REPLAY_COUNT else None


def comment_attributes(attributes: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """A comment's attributes split into the producer's own and ESP's replay count (0 when it
    carries no valid one; an invalid one stays the producer's attribute)."""
    original = dict(attributes)
    replay_count = parse_replay_count(original.get(ATTR_REPLAY_COUNT))
    if replay_count is None:
        return original, 0
    del original[ATTR_REPLAY_COUNT]
    return original, replay_count


def _parse_attempt(value: str | None) -> int | None:
    """A delivery attempt: a plain decimal, 1 or more."""
    attempt = _plain_decimal(value, 9)
    return attempt if attempt else None


def as_utc(t: dt.datetime) -> dt.datetime | None:
    """`t` in UTC (naive means UTC); None when it cannot be expressed in UTC (year 1 or 9999 edges)."""
    try:
        return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):
        return None


def _parse_time(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time, in UTC; None when it does not parse."""
    if not value or len(value) > 64:
        return None
    try:
        return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


def _utf8_len(value: str) -> int:
    return len(value.encode("utf-8", errors="surrogatepass"))


def encodes_utf8(value: str) -> bool:
    """Whether UTF-8 can carry `value` (a lone surrogate, which JSON's escapes can spell, it cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def attribute_problem(key: str, value: str) -> str | None:
    """Why Pub/Sub would refuse this attribute as it is, or None when it takes it."""
    if not (encodes_utf8(key) and encodes_utf8(value)):
        return "not valid UTF-8"
    if not 1 <= _utf8_len(key) <= MAX_ATTRIBUTE_KEY_BYTES:
        return f"a name must be 1 to {MAX_ATTRIBUTE_KEY_BYTES} bytes"
    if key.startswith("goog"):
        return "Pub/Sub refuses names that start with 'goog'"
    if _utf8_len(value) > MAX_ATTRIBUTE_VALUE_BYTES:
        return f"a value must be at most {MAX_ATTRIBUTE_VALUE_BYTES} bytes"
    return None


def _attribute_fits(key: str, value: str) -> bool:
    """Whether Pub/Sub takes this attribute as it is."""
    return attribute_problem(key, value) is None


def _field_bytes(payload: int) -> int:
    """A length-delimited protobuf field: one tag byte, the length as a varint, the payload."""
    return 1 + max(1, (payload.bit_length() + 6) // 7) + payload


def pubsub_message_bytes(data: bytes, attributes: Mapping[str, str], ordering_key: str = "") -> int:
    """What one message adds to a Pub/Sub publish request, in bytes (protobuf encoding, an upper bound)."""
    size = _field_bytes(len(data)) if data else 0
    for key, value in attributes.items():
        size += _field_bytes(_field_bytes(_utf8_len(key)) + _field_bytes(_utf8_len(value)))
    if ordering_key:
        size += _field_bytes(_utf8_len(ordering_key))
    return _field_bytes(size)


def _renamed(key: str) -> bool:
    """Whether an original attribute travels on a dead letter as `esp_orig.<key>`."""
    return in_esp_namespace(key) or key in CLIENT_KEYWORDS


def _wire_name(key: str) -> str:
    return ORIGINAL_PREFIX + key if _renamed(key) else key


def _seal(header: Mapping[str, Any]) -> bytes:
    return ENVELOPE_MAGIC + json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _open_envelope(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and the body of an envelope; ValueError when `data` is not one."""
    end = data.find(b"\n", len(ENVELOPE_MAGIC))
    if not data.startswith(ENVELOPE_MAGIC) or end < 0:
        raise ValueError("esp_envelope is set but the data is not an envelope")
    try:
        header = json.loads(data[len(ENVELOPE_MAGIC) : end])
    except (ValueError, RecursionError):
        raise ValueError("the envelope's header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the envelope's header is not an object")
    return header, data[end + 1 :]


def _string_map(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return value


def _cut_short(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message ESP could not score, with why; the one type the worker writes and replay reads.

    `data` is the original message body, byte for byte, and `attributes` its original attributes
    (names as the producer sent them), so it can be republished exactly as it came. `kept` says
    whether the letter holds them whole; with KEPT_BODY_CUT, `data` is only the body's first bytes
    and `body_sha256`/`body_bytes` describe the whole body. Publish it with `to_message()`.
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
    kept: str = KEPT_WHOLE
    body_sha256: str | None = None
    body_bytes: int | None = None

    @property
    def replayable(self) -> bool:
        """Whether republishing it sends exactly what the producer sent."""
        return self.kept == KEPT_WHOLE

    def kept_note(self) -> str | None:
        """For people: what the letter could not keep, and where the rest may be; None when whole."""
        if self.kept == KEPT_BODY_CUT:
            return (
                f"body not kept: its {self.body_bytes} bytes (sha256 {self.body_sha256}) did not fit in Pub/Sub's "
                f"10 MB message next to the dead letter's attributes; only the first {len(self.data)} bytes are here. "
                "The whole body is only with its producer; it cannot be replayed from here"
            )
        if self.kept == KEPT_DAMAGED:
            return "the letter did not read back whole (see the reason); it cannot be replayed from here"
        return None

    def _esp_attributes(self) -> dict[str, str]:
        esp = {
            ATTR_STAGE: self.stage,
            ATTR_ERROR_TYPE: self.error_type,
            ATTR_REASON: self.reason,
            ATTR_TIME: rfc3339(as_utc(self.time) or utc_now()),
        }
        if self.worker:
            esp[ATTR_WORKER] = self.worker
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
        if self.kind != KIND_WORKER:
            esp[ATTR_KIND] = self.kind
        if self.kept == KEPT_DAMAGED:
            esp[ATTR_KEPT] = KEPT_DAMAGED
        return {k: clip_utf8(v) for k, v in esp.items()}

    def to_message(self, *, max_bytes: int = MAX_DEAD_LETTER_BYTES) -> tuple[bytes, dict[str, str]]:
        """The dead letter as Pub/Sub message data and attributes, always within Pub/Sub's limits.

        Normally the data is the body, byte for byte, and the attributes are the original ones
        (ESP-namespaced names under `esp_orig.`) plus ESP's. When the originals cannot all be
        attributes (too many next to ESP's, or names too long once renamed), the data becomes an
        envelope: ENVELOPE_MAGIC, one JSON line with the original attributes, then the body, and
        `esp_envelope` is set. When the whole does not fit in `max_bytes` (a body close to 10 MB),
        only the body's first bytes are kept, with `esp_kept=body_cut` and the whole body's SHA-256
        and size. `from_pubsub` reads every form back.
        """
        esp = self._esp_attributes()
        header: dict[str, Any] = {}
        if self.ordering_key:
            if _attribute_fits(ATTR_ORDERING_KEY, self.ordering_key):
                esp[ATTR_ORDERING_KEY] = self.ordering_key
            else:
                header["ordering_key"] = self.ordering_key
        placed = {_wire_name(k): v for k, v in self.attributes.items()}
        if not header and len(placed) + len(esp) + _CUT_ATTRIBUTES <= MAX_ATTRIBUTES and all(
            _attribute_fits(k, v) for k, v in placed.items()
        ):
            head, attributes = b"", {**placed, **esp}
        else:
            header["attributes"] = dict(self.attributes)
            head, attributes = _seal(header), {**esp, ATTR_ENVELOPE: "1"}
        body, sha256, size = self.data, self.body_sha256, self.body_bytes
        if self.kept != KEPT_BODY_CUT and pubsub_message_bytes(head + body, attributes) <= max_bytes:
            return head + body, attributes
        # Too large: keep what fits of the body, and the whole body's digest and size.
        if self.kept != KEPT_BODY_CUT or sha256 is None or size is None:
            sha256, size = hashlib.sha256(body).hexdigest(), len(body)
        marker = KEPT_DAMAGED if self.kept == KEPT_DAMAGED else KEPT_BODY_CUT
        attributes.update({ATTR_KEPT: marker, ATTR_BODY_SHA256: sha256, ATTR_BODY_BYTES: str(size)})
        if pubsub_message_bytes(head, attributes) > max_bytes and head:
            # Only attributes far beyond what Pub/Sub delivers get here: keep their digest instead.
            lost = json.dumps(header, ensure_ascii=True, sort_keys=True).encode("ascii")
            head = _seal({"attributes_sha256": hashlib.sha256(lost).hexdigest(), "attributes_count": len(self.attributes)})
            attributes[ATTR_KEPT] = KEPT_DAMAGED
        # Growing the data by n bytes grows the message by n plus at most 6 bytes of lengths.
        room = max(0, max_bytes - pubsub_message_bytes(head, attributes) - 6)
        return head + body[:room], attributes

    def to_attributes(self) -> dict[str, str]:
        """The attributes of `to_message()`. They go with `data` only when the letter needs no
        envelope and no cut (all ordinary traffic); publish `to_message()` instead."""
        return self.to_message()[1]

    @classmethod
    def from_pubsub(
        cls, data: bytes, attributes: Mapping[str, str], *, publish_time: dt.datetime | None = None, ordering_key: str = ""
    ) -> DeadLetter:
        """Reads any message on the dead-letter topic; never raises.

        ESP's own (the worker's, or one replay parked) is read by its esp_* attributes; one Pub/Sub's
        dead-letter policy forwarded (or anyone else's) carries only the comment's own attributes,
        and its esp_* ones are the producer's, never a verdict.
        """
        data = bytes(data)
        attrs = {str(k): str(v) for k, v in attributes.items()}
        when = as_utc(publish_time) if publish_time else None
        if ATTR_ERROR_TYPE in attrs and not any(k.startswith(POLICY_ATTR_PREFIX) for k in attrs):
            return _read_esp_letter(data, attrs, when, ordering_key)
        return _read_forwarded_letter(data, attrs, when, ordering_key)


def _read_forwarded_letter(data: bytes, attrs: dict[str, str], when: dt.datetime | None, ordering_key: str) -> DeadLetter:
    """A letter ESP did not write: all but Pub/Sub's attributes are the comment's own."""
    policy = any(k.startswith(POLICY_ATTR_PREFIX) for k in attrs)
    original, replay_count = comment_attributes({k: v for k, v in attrs.items() if not k.startswith(POLICY_ATTR_PREFIX)})
    return DeadLetter(
        data=data,
        attributes=original,
        stage=STAGE_UNKNOWN,
        error_type=POLICY_ERROR_TYPE if policy else UNKNOWN_ERROR_TYPE,
        reason=POLICY_REASON if policy else UNKNOWN_REASON,
        worker="",
        time=when or utc_now(),
        delivery_attempt=_parse_attempt(attrs.get(POLICY_DELIVERY_COUNT, "")),
        source_subscription=attrs.get(POLICY_SOURCE_SUBSCRIPTION) or None,
        ordering_key=ordering_key,
        replay_count=replay_count,
        kind=KIND_POLICY if policy else KIND_UNKNOWN,
    )


def _read_esp_letter(data: bytes, attrs: dict[str, str], when: dt.datetime | None, ordering_key: str) -> DeadLetter:
    """A letter ESP wrote. What does not read back is named in the reason, never raised."""
    problems: list[str] = []
    original: dict[str, str] = {}
    for key, value in attrs.items():
        if key.startswith(ORIGINAL_PREFIX) and _renamed(key[len(ORIGINAL_PREFIX) :]):
            original[key[len(ORIGINAL_PREFIX) :]] = value
        elif not key.startswith(ATTR_PREFIX):
            original[key] = value
    body, kept = data, KEPT_WHOLE
    if ATTR_ENVELOPE in attrs:
        try:
            header, body = _open_envelope(data)
            from_header = _string_map(header.get("attributes"))
            if from_header is None:
                raise ValueError("the envelope holds no attributes")
            # ESP seals only what Pub/Sub delivered to the worker. Anything else was written by hand,
            # and JSON can carry what Pub/Sub cannot (a lone surrogate, a `goog` name): republished,
            # such an attribute stopped a whole replay (the client cannot even encode it), and
            # exported, it stopped the export.
            for key, value in from_header.items():
                problem = attribute_problem(key, value)
                if problem:
                    raise ValueError(f"the envelope holds the attribute {_cut_short(key)}, which Pub/Sub refuses: {problem}")
            sealed_key = header.get("ordering_key")
            if isinstance(sealed_key, str) and not encodes_utf8(sealed_key):
                raise ValueError("the envelope's ordering key is not valid UTF-8")
            original.update(from_header)
            if isinstance(sealed_key, str):
                ordering_key = ordering_key or sealed_key
        except ValueError as exc:
            problems.append(str(exc))
            body, kept = data, KEPT_DAMAGED

    def parsed(name: str, parse: Any, default: Any) -> Any:
        if name not in attrs:
            return default
        value = parse(attrs[name])
        if value is None:
            problems.append(f"{name}={_cut_short(attrs[name])} does not read")
            return default
        return value

    time = parsed(ATTR_TIME, _parse_time, None)
    attempt = parsed(ATTR_DELIVERY_ATTEMPT, _parse_attempt, None)
    replay_count = parsed(ATTR_REPLAY_COUNT, parse_replay_count, 0)
    parked = parsed(ATTR_PARKED, {"true": True, "false": False}.get, False)
    kind = parsed(ATTR_KIND, lambda v: v if v in KINDS else None, KIND_WORKER)
    sha256, size = None, None
    marked = attrs.get(ATTR_KEPT, KEPT_WHOLE)
    if marked == KEPT_BODY_CUT:
        sha256, size = attrs.get(ATTR_BODY_SHA256, ""), _plain_decimal(attrs.get(ATTR_BODY_BYTES), 9)
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256) or size is None or size < len(body):
            problems.append("esp_kept=body_cut without a valid esp_body_sha256 and esp_body_bytes")
            marked, sha256, size = KEPT_DAMAGED, None, None
    elif marked not in (KEPT_WHOLE, KEPT_DAMAGED):
        problems.append(f"{ATTR_KEPT}={_cut_short(marked)} does not read")
        marked = KEPT_DAMAGED
    if kept == KEPT_WHOLE:
        kept = marked
    error_type, reason = attrs[ATTR_ERROR_TYPE], attrs.get(ATTR_REASON, "")
    if not error_type:
        problems.append(f"{ATTR_ERROR_TYPE} is empty")
    if problems:
        reason = clip_utf8(f"dead-letter attributes could not be read: {'; '.join(problems)} (recorded: {error_type}: {reason})")
        error_type = UNREADABLE
    return DeadLetter(
        data=body,
        attributes=original,
        stage=attrs.get(ATTR_STAGE) or STAGE_UNKNOWN,
        error_type=error_type,
        reason=reason,
        worker=attrs.get(ATTR_WORKER, ""),
        time=time or when or utc_now(),
        delivery_attempt=attempt,
        source_message_id=attrs.get(ATTR_SOURCE_MESSAGE_ID) or None,
        source_subscription=attrs.get(ATTR_SOURCE_SUBSCRIPTION) or None,
        ordering_key=ordering_key or attrs.get(ATTR_ORDERING_KEY, ""),
        replay_count=replay_count,
        parked=parked,
        kind=kind,
        kept=kept,
        body_sha256=sha256,
        body_bytes=size,
    )


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
    """A dead letter for a comment that failed now; publish it with `.to_message()`.

    `attributes` are the comment's own: all are kept (an `esp_*` one under `esp_orig.`), except a
    valid `esp_replay_count`, which is ESP's and carries on.
    """
    original, replay_count = comment_attributes(attributes)
    return DeadLetter(
        data=data,
        attributes=original,
        stage=stage,
        error_type=error_type,
        reason=reason,
        worker=worker,
        time=utc_now(),
        delivery_attempt=delivery_attempt,
        source_message_id=source_message_id,
        source_subscription=source_subscription,
        ordering_key=ordering_key,
        replay_count=replay_count,
    )


def labels_from_outputs(output_keys: Sequence[str]) -> list[str]:
    """The model contract: every signature output not prefixed `esp_` is a label's probability."""
    return sorted(k for k in output_keys if not k.startswith(ATTR_PREFIX))
