"""`POST /v1/score`: ESP's own request and response, in the stream's contracts.

The request is one comment in the stream's comment contract, or many under `comments`:

    {"id": "c-1", "text": "you are great"}
    {"comments": [{"id": "c-1", "text": "..."}, {"text": "an id is optional here"}]}

The answer is the stream's score record (`esp.contracts.Score.to_dict`, same fields, same
`schema_version`) for one comment, or `{"scores": [...], "errors": [...]}` for many, in request
order; a comment the model refused alone is listed under `errors` with its index, and its
neighbours are scored. A comment without an id gets one (`req-<process>-<request>-<index>`), so every
record can still be deduplicated on (`id`, `model`).

Every comment is validated by the contract code (`esp.contracts.comment_from_fields`), so the HTTP
path and the stream refuse exactly the same comments, with the same error types.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Sequence
from typing import Any

from api.errors import ApiError, Reason
from esp.contracts import Comment, ErrorType, InvalidComment, comment_from_fields
from esp.settings.api import ApiSettings
from esp.settings.contracts import CommentSettings

_COMMENT_FIELDS = frozenset({"id", "text"})


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    comments: list[Comment]
    many: bool  # answered as {"scores": [...]} rather than one record


def parse_score_request(obj: Any, settings: ApiSettings, comment_settings: CommentSettings) -> ScoreRequest:
    """Validates a decoded /v1/score body; raises ApiError (400 or 413) with the reason and, for many, the index."""
    if not isinstance(obj, dict):
        raise ApiError(400, ErrorType.NOT_AN_OBJECT, f"the body must be a JSON object, got {json_type(obj)}")
    if "comments" in obj:
        extra = sorted(set(obj) - {"comments"})
        if extra:
            raise ApiError(400, Reason.INVALID_REQUEST, f"unknown field(s) beside 'comments': {', '.join(map(repr, extra))}")
        items = obj["comments"]
        if not isinstance(items, list):
            raise ApiError(400, Reason.INVALID_REQUEST, f"'comments' must be an array, got {json_type(items)}")
        if not items:
            raise ApiError(400, Reason.INVALID_REQUEST, "'comments' is empty: send at least one comment")
        if len(items) > settings.api_max_comments:
            raise ApiError(
                413, Reason.TOO_MANY_COMMENTS,
                f"{len(items)} comments in one request, the limit is {settings.api_max_comments}",
                metadata={"limit": settings.api_max_comments},
            )
        prefix = generated_prefix()
        return ScoreRequest([_comment(item, i, prefix, settings, comment_settings) for i, item in enumerate(items)], many=True)
    return ScoreRequest([_comment(obj, None, generated_prefix(), settings, comment_settings)], many=False)


def _comment(item: Any, index: int | None, prefix: str, settings: ApiSettings, comment_settings: CommentSettings) -> Comment:
    where = "" if index is None else f"comments[{index}]: "
    meta: dict[str, Any] = {} if index is None else {"index": index}
    if not isinstance(item, dict):
        raise ApiError(400, ErrorType.NOT_AN_OBJECT, f"{where}a comment must be a JSON object, got {json_type(item)}", metadata=meta)
    extra = sorted(set(item) - _COMMENT_FIELDS)
    if extra:
        raise ApiError(400, Reason.INVALID_REQUEST, f"{where}unknown field(s) {', '.join(map(repr, extra))}: a comment has 'id' and 'text'", metadata=meta)
    text = item.get("text")
    # Checked before the contract's own checks: its size limit is the Pub/Sub body's, larger.
    size = utf8_size(text) if isinstance(text, str) else None
    if size is not None and size > settings.api_max_text_bytes:
        raise ApiError(
            413, Reason.TEXT_TOO_LONG,
            f"{where}'text' is {size} bytes of UTF-8, the limit is {settings.api_max_text_bytes}",
            metadata={**meta, "limit": settings.api_max_text_bytes},
        )
    cid = item["id"] if "id" in item else f"{prefix}-{index or 0}"
    try:
        return comment_from_fields(cid, text, max_body_bytes=comment_settings.max_body_bytes)
    except InvalidComment as exc:
        raise ApiError(400, exc.error_type, f"{where}{exc.reason}", metadata=meta) from None


def utf8_size(text: str) -> int | None:
    """UTF-8 length of `text`, or None when it cannot be encoded (a lone surrogate from a JSON \\ud800 escape)."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


# Generated ids: a random per-process prefix and a counter. Unique across pods and restarts like a
# UUID per request, at a fraction of its cost (a uuid4 per request was 5% of the API's CPU).
_PROCESS_PREFIX = f"req-{uuid.uuid4().hex[:12]}"
_REQUESTS = itertools.count(1)


def generated_prefix() -> str:
    return f"{_PROCESS_PREFIX}-{next(_REQUESTS)}"


def json_type(value: Any) -> str:
    """What a decoded JSON value is, for error messages: never its repr, which a deeply nested list
    (valid JSON) can make raise RecursionError, and which echoes any length."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def render_scores(request: ScoreRequest, records: Sequence[dict | None], errors: Sequence[dict]) -> dict[str, Any]:
    """The /v1/score answer for a request with several comments: scores in order, then the refused ones."""
    return {"scores": [r for r in records if r is not None], "errors": list(errors)}
