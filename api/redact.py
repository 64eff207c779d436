"""Keeps API keys out of every log line: the access log, uvicorn's own logs, and any library's.

Keys travel as `?key=KEY` or in the `X-Goog-Api-Key` header. The API reads the query key with
`query_key`, which decodes parameter names as every query parser does (`%6Bey=` is `key=`); the
access log writes the path with `redact_query` applied, which masks every parameter whose decoded
name is `key` in any case, so whatever the API accepts as a key is masked. `RedactingFilter`,
installed on the process's log handlers by `esp api`, rewrites every record's final message, so a
key in a URL that some other logger prints (an invalid request, a traceback) is masked too.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, quote, unquote_plus

MASK = "REDACTED"

# key=VALUE in a query string, the name's letters possibly percent-encoded (`%6Bey=`), and the header.
_QUERY_KEY = re.compile(r"(?i)((?:^|[?&;\s\"'(])(?:k|%6b)(?:e|%65)(?:y|%79)=)[^&\s\"'#;)]*")
_HEADER_KEY = re.compile(r"(?i)(x-goog-api-key[\"']?\s*[:=,]\s*[\"']?(?:b[\"'])?)[^\s\"',)}\]]+")


def redact(text: str) -> str:
    if "key" not in text.lower() and "%" not in text:
        return text  # the common line: no regex
    return _HEADER_KEY.sub(r"\1" + MASK, _QUERY_KEY.sub(r"\1" + MASK, text))


def query_key(query: str) -> str | None:
    """The API key a query string carries (the first non-empty `key` parameter), or None."""
    if "key" not in query.lower() and "%" not in query:
        return None  # the common request: no parse
    return next((value for name, value in parse_qsl(query) if name == "key" and value), None)


def _is_key_name(name: str) -> bool:
    # Decoded as parse_qsl decodes it, so that no spelling the API accepts escapes the mask.
    return unquote_plus(name, errors="replace").lower() == "key"


def redact_query(query: str) -> str:
    """A query string with the value of every parameter named `key` (once decoded, any case) masked."""
    if not query:
        return query
    parts = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        parts.append(f"{name}={MASK}" if sep and _is_key_name(name) else part)
    return "&".join(parts)


def printable_path(raw_path: bytes, query: bytes) -> str:
    """The request target as it may be logged: key masked, control characters escaped."""
    path = quote(raw_path.decode("latin-1"), safe="/:@!$&'()*+,;=-._~%")
    q = redact_query(query.decode("latin-1"))
    return f"{path}?{quote(q, safe='/:@!$&()*+,;=-._~%?')}" if q else path


class RedactingFilter(logging.Filter):
    """Masks API keys in a record's rendered message (and traceback) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned is not message and cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            safe = redact(text)
            if safe != text:
                record.exc_info, record.exc_text = None, safe
        return True


def install(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
