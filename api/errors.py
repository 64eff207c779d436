"""Every error the HTTP API answers: a status, a machine-readable reason and a message for people.

One error type and one wire format for every endpoint: Google's JSON error format
(`{"error": {"code", "message", "status", "details"}}`), which Perspective clients already parse.
On the Perspective endpoints a request error carries Perspective's own detail
(`{"@type": ".../google.commentanalyzer.v1alpha1.Error", "errorType": "COMMENT_EMPTY"}`) because
real clients branch on `errorType`; everything else carries a `google.rpc.ErrorInfo` whose
`reason` is ESP's (the same vocabulary as dead letters: `empty_text`, `invalid_json`, ...).
No path answers a bare 500: an error nobody foresaw is still answered with its own reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PERSPECTIVE_ERROR_TYPE_URL = "type.googleapis.com/google.commentanalyzer.v1alpha1.Error"
ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN = "esp"

# HTTP status -> the canonical status name Google's error format puts beside it.
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class Perspective:
    """Perspective's ErrorType values (its API reference, "Limits and errors")."""

    COMMENT_TOO_LONG = "COMMENT_TOO_LONG"
    COMMENT_EMPTY = "COMMENT_EMPTY"
    NO_REQUESTED_ATTRIBUTES = "NO_REQUESTED_ATTRIBUTES"
    LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE = "LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE"
    INVALID_REQUEST = "INVALID_REQUEST"


class Reason:
    """ESP's reasons for errors that are not a comment breaking its contract (those use esp.contracts.ErrorType)."""

    BODY_TOO_LARGE = "body_too_large"
    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_REQUEST = "invalid_request"
    TOO_MANY_COMMENTS = "too_many_comments"
    TEXT_TOO_LONG = "text_too_long"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    READ_TIMEOUT = "read_timeout"
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    MODEL_UNAVAILABLE = "model_unavailable"
    FEEDBACK_UNAVAILABLE = "feedback_unavailable"
    CORS_ORIGIN_NOT_ALLOWED = "cors_origin_not_allowed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class ApiError(Exception):
    """An answer other than success. `reason` is ESP's code; `perspective_type` Perspective's, where one fits."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        perspective_type: str | None = None,
        perspective_detail: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        message = _printable(message)
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.perspective_type = perspective_type
        self.perspective_detail = _printable(dict(perspective_detail or {}))
        self.metadata = {_printable(str(k)): _printable(str(v)) for k, v in (metadata or {}).items()}
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after_s is None:
            return []
        # Retry-After takes whole seconds; rounding down would invite a retry that is refused again.
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after_s))).encode())]

    def body(self, *, perspective: bool) -> dict[str, Any]:
        if perspective and self.perspective_type is not None:
            detail: dict[str, Any] = {"@type": PERSPECTIVE_ERROR_TYPE_URL, "errorType": self.perspective_type}
            detail.update(self.perspective_detail)
        else:
            detail = {"@type": ERROR_INFO_TYPE_URL, "reason": self.reason, "domain": ERROR_DOMAIN}
            if self.metadata:
                detail["metadata"] = self.metadata
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "status": STATUS_NAMES.get(self.status, "UNKNOWN"),
                "details": [detail],
            }
        }

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.reason!r}, {self.message!r})"


def _printable(value: Any) -> Any:
    """`value` with every string able to leave as UTF-8 JSON.

    Error messages quote what the client sent, and JSON lets a client send a lone surrogate
    (`"\\ud800"`) as a field name, which no UTF-8 answer can carry: such characters are written as
    their escape, so the answer is still the 400 it should be.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def bad_request(reason: str, message: str, *, perspective_type: str = Perspective.INVALID_REQUEST, **kwargs: Any) -> ApiError:
    return ApiError(400, reason, message, perspective_type=perspective_type, **kwargs)
