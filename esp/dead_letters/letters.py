"""One pulled dead letter: the message, its lease, and its reading (esp.contracts.DeadLetter).

Everything here is hostile input made safe: a letter's body and attributes may be anything, and
nothing a verb asks of a Letter (its ids, classification, export record) raises.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import functools
import hashlib
import json
from typing import Any

from esp.contracts import (
    KEPT_BODY_CUT,
    DeadLetter,
    as_utc,
    encodes_utf8,
    rfc3339,
    utc_now,
)


@dataclasses.dataclass
class Letter:
    """A dead letter as pulled from the hold subscription: the message, its lease and its reading."""

    ack_id: str
    message_id: str
    publish_time: dt.datetime
    attributes: dict[str, str]  # exactly as on the dead-letter message
    dead_letter: DeadLetter
    size_bytes: int  # of the message's data as pulled

    @classmethod
    def from_received(cls, received: Any) -> Letter:
        msg = received.message
        attrs = {str(k): str(v) for k, v in msg.attributes.items()}
        data = bytes(msg.data)
        publish_time = as_utc(msg.publish_time) or utc_now()
        return cls(
            ack_id=received.ack_id,
            message_id=msg.message_id,
            publish_time=publish_time,
            attributes=attrs,
            dead_letter=DeadLetter.from_pubsub(data, attrs, publish_time=publish_time, ordering_key=msg.ordering_key),
            size_bytes=len(data),
        )

    @property
    def body(self) -> bytes:
        """The original body (or, when it was cut, its first bytes)."""
        return self.dead_letter.data

    @property
    def ordering_key(self) -> str:
        """The comment's key: the message's own, or the one the worker kept as an attribute."""
        return self.dead_letter.ordering_key

    @functools.cached_property
    def comment_id(self) -> str | None:
        """The comment's id when the body parses as a comment object; None for poison bodies."""
        if not self.dead_letter.replayable:
            return None
        try:
            obj = json.loads(self.body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return None
        cid = obj.get("id") if isinstance(obj, dict) else None
        # A JSON escape can spell an id UTF-8 cannot carry (`"\\ud800"`, the contract's
        # unencodable_text, which any producer can send): written out by export or show --json, it
        # stopped the command. Such a body has no id to show or match; its message id still works.
        return cid if isinstance(cid, str) and cid and encodes_utf8(cid) else None

    @property
    def failed_at(self) -> dt.datetime:
        return self.dead_letter.time

    def ids(self) -> set[str]:
        """Every id an operator may know this dead letter by."""
        found = {self.message_id}
        if self.comment_id:
            found.add(self.comment_id)
        if self.dead_letter.source_message_id:
            found.add(self.dead_letter.source_message_id)
        return found

    def classification(self, now: dt.datetime | None = None) -> dict[str, Any]:
        d = self.dead_letter
        now = now or utc_now()
        return {
            "message_id": self.message_id,
            "comment_id": self.comment_id,
            "kind": d.kind,
            "stage": d.stage,
            "error_type": d.error_type,
            "reason": d.reason,
            "delivery_attempts": d.delivery_attempt,
            "replay_count": d.replay_count,
            "parked": d.parked,
            "kept": d.kept,
            "dead_lettered_at": rfc3339(self.failed_at),
            "age_s": round(max(0.0, (now - self.failed_at).total_seconds()), 3),
            "worker": d.worker or None,
            "source_subscription": d.source_subscription,
            "source_message_id": d.source_message_id,
        }

    def to_record(self) -> dict[str, Any]:
        """One JSONL line of `export`: what to republish by hand (the original body, attributes and
        ordering key), why it failed, and the dead-letter message as it was."""
        d = self.dead_letter
        try:
            text, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        cut = d.kept == KEPT_BODY_CUT
        return {
            "message_id": self.message_id,
            "publish_time": rfc3339(self.publish_time),
            "ordering_key": self.ordering_key,
            "attributes": dict(sorted(d.attributes.items())),
            "data": text,
            "data_encoding": encoding,
            # Of the whole body, also when `data` holds only its first bytes (kept: body_cut).
            "body_bytes": d.body_bytes if cut else len(self.body),
            "body_sha256": d.body_sha256 if cut else hashlib.sha256(self.body).hexdigest(),
            "dead_letter_attributes": dict(sorted(self.attributes.items())),
            "classification": self.classification(),
        }


def record_data(record: Any) -> bytes:
    """The original body of an exported record; ValueError, with the reason, for anything else."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not {type(record).__name__}")
    data, encoding = record.get("data"), record.get("data_encoding", "utf-8")
    if not isinstance(data, str):
        raise ValueError(f"'data' must be a string, got {type(data).__name__}")
    if encoding == "base64":
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'data' is not valid base64") from None
    if encoding != "utf-8":
        raise ValueError(f"unknown data_encoding {str(encoding)[:40]!r} (utf-8 or base64)")
    try:
        return data.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("'data' holds characters UTF-8 cannot carry") from None
