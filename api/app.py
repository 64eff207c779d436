"""The ASGI application: routing, limits, API keys, rate limits, CORS, the access log, the answers.

A plain ASGI callable rather than a framework: measured on this machine, FastAPI costs 4x the CPU
per request of this on the same uvicorn (docs/api.md), and the API's budget is 0.4 ms per request.

Order of checks for a scoring request, each with its own status and reason:
route (404/405) -> API key (401 missing, 403 unknown) -> body size (413, from Content-Length before
reading) -> body read within api_read_timeout_s (408) -> JSON (400) -> the endpoint's own
validation (400/413) -> rate limit (429) -> scoring (429 queue full, 503 model unavailable or no
score by the deadline, 422 refused by the model) -> 200. An exception nobody foresaw is logged with its traceback
(keys redacted) and answered 500 with reason `internal` and an incident id, never a dropped
connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import perspective as pv
from api.errors import ApiError, Reason
from api.feedback import FeedbackPublisher
from api.keys import KeyEntry, KeyStore
from api.metrics import ApiMetrics
from api.native import generated_prefix, parse_score_request
from api.openapi import build_openapi
from api.redact import printable_path, query_key
from api.service import Refused, ScoringService, refused_error
from esp.contracts import AmbiguousJson, InvalidComment, comment_from_fields, loads_json
from esp.settings.api import ApiSettings
from esp.settings.contracts import CommentSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("api.access")

STATIC = Path(__file__).resolve().parent / "static"
JSON = b"application/json"
_COMMON_HEADERS = [(b"x-content-type-options", b"nosniff")]
# The page and the docs load nothing from elsewhere (they must work offline): the browser enforces it.
_PAGE_CSP = b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
_DOCS_CSP = b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'"


@dataclasses.dataclass
class Request:
    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: dict[bytes, bytes]
    receive: Callable[[], Awaitable[dict]]
    started: float
    key: KeyEntry | None = None
    comments: int = 0

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None


@dataclasses.dataclass(frozen=True)
class Route:
    endpoint: str  # metric label
    method: str
    handler: str  # name of the ApiApp method
    keyed: bool = False  # needs an API key when keys are configured
    perspective: bool = False  # errors carry Perspective's errorType


ROUTES: dict[str, Route] = {
    "/v1/score": Route("score", "POST", "_score", keyed=True),
    "/v1alpha1/comments:analyze": Route("analyze", "POST", "_analyze", keyed=True, perspective=True),
    "/v1alpha1/comments:suggestscore": Route("suggestscore", "POST", "_suggest", keyed=True, perspective=True),
    "/": Route("page", "GET", "_page"),
    "/static/app.js": Route("page", "GET", "_static"),
    "/static/style.css": Route("page", "GET", "_static"),
    "/favicon.ico": Route("page", "GET", "_favicon"),
    "/docs": Route("docs", "GET", "_docs"),
    "/docs/swagger-ui-bundle.js": Route("docs", "GET", "_swagger_asset"),
    "/docs/swagger-ui.css": Route("docs", "GET", "_swagger_asset"),
    "/docs/init.js": Route("docs", "GET", "_static"),
    "/openapi.json": Route("docs", "GET", "_openapi"),
    "/healthz": Route("health", "GET", "_healthz"),
    "/readyz": Route("health", "GET", "_readyz"),
    "/metrics": Route("metrics", "GET", "_metrics"),
}
_CONTENT_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8", ".html": b"text/html; charset=utf-8"}


class ApiApp:
    """The API as an ASGI callable. `service` scores; `keys` (None: no key needed) authenticates."""

    def __init__(
        self,
        *,
        service: ScoringService,
        settings: ApiSettings,
        comment_settings: CommentSettings | None = None,
        metrics: ApiMetrics | None = None,
        keys: KeyStore | None = None,
        feedback: FeedbackPublisher | None = None,
        not_ready: Callable[[], str | None] = lambda: None,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.service = service
        self.settings = settings
        self.comment_settings = comment_settings or CommentSettings()
        self.metrics = metrics or ApiMetrics()
        self.keys = keys
        self.feedback = feedback
        self._engine_not_ready = not_ready
        self._alive = alive
        self.shutting_down = False
        self._cors = settings.cors_origins()
        self._languages = settings.languages()
        self._assets: dict[str, tuple[bytes, bytes]] = {}
        self._openapi_json = orjson.dumps(build_openapi(settings))
        self._fallback_attributes = pv.attribute_map(list(pv.PERSPECTIVE_NAMES))

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        request = Request(
            method=scope["method"],
            path=scope["path"],
            raw_path=scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape"),
            query=scope.get("query_string", b""),
            headers=dict(scope["headers"]),
            receive=receive,
            started=time.perf_counter(),
        )
        route = ROUTES.get(request.path)
        endpoint = route.endpoint if route else "other"
        self.metrics.in_flight.inc()
        try:
            status = await self._handle(request, route, send)
        finally:
            self.metrics.in_flight.dec()
        elapsed = time.perf_counter() - request.started
        self.metrics.answered(endpoint, status, elapsed)
        if self.settings.api_access_log and endpoint not in ("health", "metrics"):
            access_log.info(
                '%s %s %d %.1fms client=%s comments=%d',
                request.method, printable_path(request.raw_path, request.query), status, elapsed * 1000,
                request.key.name if request.key else "-", request.comments,
            )

    async def _handle(self, request: Request, route: Route | None, send: Callable[[dict], Awaitable[None]]) -> int:
        perspective = route is not None and route.perspective
        cors = self._cors_headers(request)
        try:
            if route is None:
                raise ApiError(404, Reason.NOT_FOUND, f"no such endpoint: {request.path[:200]} (see /docs)")
            if request.method == "OPTIONS":
                return await self._preflight(request, route, send)
            if request.method != route.method and not (route.method == "GET" and request.method == "HEAD"):
                raise ApiError(405, Reason.METHOD_NOT_ALLOWED, f"{request.path} takes {route.method}, not {request.method[:20]}")
            if route.keyed and self.keys is not None:
                request.key = self._authenticate(request)
            handler = getattr(self, route.handler)
            status, body, content_type, extra = await handler(request)
        except ApiError as exc:
            self.metrics.errors.labels(exc.reason).inc()
            headers = exc.headers() + cors
            if exc.status in (408, 413):
                headers.append((b"connection", b"close"))  # the rest of the body is not read
            await _send(send, exc.status, orjson.dumps(exc.body(perspective=perspective)), JSON, headers, request)
            return exc.status
        except Exception:  # noqa: BLE001 - the last guard: answer with a reason instead of dropping the connection
            incident = uuid.uuid4().hex[:12]
            log.exception("unexpected error answering %s %s (incident %s)", request.method, printable_path(request.raw_path, request.query), incident)
            self.metrics.errors.labels(Reason.INTERNAL).inc()
            error = ApiError(500, Reason.INTERNAL, f"internal error (incident {incident}, logged by the server)", metadata={"incident": incident})
            await _send(send, 500, orjson.dumps(error.body(perspective=perspective)), JSON, cors, request)
            return 500
        await _send(send, status, body, content_type, extra + cors, request)
        return status

    # ------------------------------------------------------------------ cross-cutting

    def _cors_headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        if not self._cors:
            return []
        origin = request.header(b"origin")
        headers = [(b"vary", b"Origin")]
        if origin is not None and ("*" in self._cors or origin.rstrip("/") in self._cors):
            headers.append((b"access-control-allow-origin", b"*" if "*" in self._cors else origin.encode("latin-1")))
            headers.append((b"access-control-expose-headers", b"Retry-After, Server-Timing"))
        return headers

    async def _preflight(self, request: Request, route: Route, send: Callable[[dict], Awaitable[None]]) -> int:
        origin = request.header(b"origin")
        allowed = origin is not None and self._cors and ("*" in self._cors or origin.rstrip("/") in self._cors)
        if not allowed:
            raise ApiError(
                403, Reason.CORS_ORIGIN_NOT_ALLOWED,
                f"origin {(origin or '(none)')[:200]} may not call this API from a browser (ESP_API_CORS_ORIGINS)",
            )
        headers = self._cors_headers(request) + [
            (b"access-control-allow-methods", f"{route.method}, OPTIONS".encode()),
            (b"access-control-allow-headers", b"Content-Type, X-Goog-Api-Key"),
            (b"access-control-max-age", b"600"),
        ]
        await _send(send, 204, b"", None, headers, request)
        return 204

    def _authenticate(self, request: Request) -> KeyEntry:
        assert self.keys is not None
        key = request.header(b"x-goog-api-key")
        if not key:  # an empty header is no key: a ?key= may still be there
            key = query_key(request.query.decode("latin-1"))
        if not key:
            raise ApiError(401, Reason.MISSING_API_KEY, "this API needs a key: pass ?key=KEY or the X-Goog-Api-Key header")
        entry = self.keys.lookup(key)
        if entry is None:
            raise ApiError(403, Reason.INVALID_API_KEY, "API key not valid. Please pass a valid API key.")
        return entry

    def _charge(self, request: Request, cost: int) -> None:
        request.comments = cost
        if request.key is None or self.keys is None:
            return
        wait_s = self.keys.take(request.key, cost)
        if wait_s == float("inf"):
            raise ApiError(
                429, Reason.RATE_LIMITED,
                f"this request needs {cost} comments of rate limit, more than key {request.key.name!r} may ever hold ({request.key.burst})",
            )
        if wait_s > 0:
            raise ApiError(
                429, Reason.RATE_LIMITED,
                f"rate limit of key {request.key.name!r} reached ({request.key.rate_per_s:g} comments/s, burst {request.key.burst})",
                retry_after_s=wait_s,
            )

    async def _body_json(self, request: Request, *, perspective: bool) -> Any:
        encoding = request.headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            # Decompressing would let a small body expand past the body limit; refuse it by name
            # rather than answer "not valid UTF-8" for the compressed bytes.
            raise ApiError(
                415, Reason.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not accepted: send the body uncompressed",
                perspective_type="INVALID_REQUEST",
            )
        body = await self._read_body(request)
        if not body:
            raise ApiError(400, Reason.INVALID_JSON, "the request body is empty: send a JSON object", perspective_type="INVALID_REQUEST")
        prefix = "Invalid JSON payload received. " if perspective else "the body is not valid JSON: "
        try:
            # The stream's JSON reader, not a faster one: a body two parsers would read differently
            # (a repeated key) gets the same refusal here as on the stream (esp.contracts.loads_json).
            return loads_json(body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem, reason = f"not valid UTF-8 at byte {exc.start}", Reason.INVALID_UTF8
        except json.JSONDecodeError as exc:
            problem, reason = f"{exc.msg} (line {exc.lineno}, column {exc.colno})", Reason.INVALID_JSON
        except AmbiguousJson as exc:
            problem, reason = f"ambiguous JSON: {exc}", Reason.INVALID_JSON
        except RecursionError:
            problem, reason = "nested too deeply to read", Reason.INVALID_JSON
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            problem, reason = str(exc)[:200], Reason.INVALID_JSON
        raise ApiError(400, reason, prefix + problem, perspective_type="INVALID_REQUEST")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.api_max_body_bytes
        declared = request.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.api_read_timeout_s):
                while True:
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        raise ApiError(400, Reason.INVALID_REQUEST, "the client went away before sending the whole body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(size, limit)
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            raise ApiError(408, Reason.READ_TIMEOUT, f"the request body did not arrive within {self.settings.api_read_timeout_s:g} s") from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------ scoring endpoints

    async def _score(self, request: Request) -> tuple[int, bytes, bytes, list]:
        obj = await self._body_json(request, perspective=False)
        parsed = parse_score_request(obj, self.settings, self.comment_settings)
        self._charge(request, len(parsed.comments))
        outcomes = await self.service.score(parsed.comments)
        self.metrics.scored("score", len(outcomes))
        if not parsed.many:
            outcome = outcomes[0]
            if isinstance(outcome, Refused):
                raise refused_error(outcome)
            return 200, orjson.dumps(outcome.to_dict()), JSON, []
        scores, errors = [], []
        for i, (comment, outcome) in enumerate(zip(parsed.comments, outcomes)):
            if isinstance(outcome, Refused):
                errors.append({"index": i, "id": comment.id, "error_type": outcome.error_type, "reason": outcome.reason})
            else:
                scores.append(outcome.to_dict())
        return 200, orjson.dumps({"scores": scores, "errors": errors}), JSON, []

    async def _analyze(self, request: Request) -> tuple[int, bytes, bytes, list]:
        obj = await self._body_json(request, perspective=True)
        deadline = self.service.deadline()  # for the labels and the scores together
        attributes = pv.attribute_map(await self.service.labels(deadline))
        pv.check_labels_known(attributes)
        parsed = pv.parse_analyze(
            obj,
            attributes=attributes,
            supported_languages=self._languages,
            max_text_bytes=self.settings.api_max_text_bytes,
            max_spans=self.settings.api_max_spans,
        )
        if not parsed.attributes:  # all dropped (dropUnsupportedAttributes): nothing to score
            return 200, orjson.dumps(pv.render_analyze(parsed, None, [])), JSON, []
        prefix = generated_prefix()
        try:
            comments = [comment_from_fields(f"{prefix}-{i}", t, max_body_bytes=self.comment_settings.max_body_bytes)
                        for i, t in enumerate([parsed.text, *parsed.span_texts()])]
        except InvalidComment as exc:
            raise ApiError(400, exc.error_type, exc.reason, perspective_type="INVALID_REQUEST") from None
        self._charge(request, len(comments))
        outcomes = await self.service.score(comments, deadline=deadline)
        self.metrics.scored("analyze", len(outcomes))
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, Refused):
                which = "the comment" if i == 0 else f"sentence {i} of the comment"
                raise refused_error(Refused(outcome.error_type, f"{which}: {outcome.reason}"), perspective=True)
        scores = [o for o in outcomes if not isinstance(o, Refused)]
        missing = [a.label for a in parsed.attributes if any(a.label not in s.probabilities for s in scores)]
        if missing:
            raise ApiError(503, Reason.MODEL_UNAVAILABLE, f"the model version changed during the request (no {missing[0]!r} now); retry", retry_after_s=1)
        return 200, orjson.dumps(pv.render_analyze(parsed, scores[0], scores[1:])), JSON, []

    async def _suggest(self, request: Request) -> tuple[int, bytes, bytes, list]:
        obj = await self._body_json(request, perspective=True)
        attributes = pv.attribute_map(await self.service.labels()) or self._fallback_attributes
        suggestion = pv.parse_suggest(obj, attributes=attributes, max_text_bytes=self.settings.api_max_text_bytes)
        if self.feedback is None:
            raise ApiError(503, Reason.FEEDBACK_UNAVAILABLE, "this API has no feedback topic configured", retry_after_s=60)
        self._charge(request, 1)
        await self.feedback.publish(suggestion.record(api_key_name=request.key.name if request.key else None))
        return 200, orjson.dumps(pv.render_suggest(suggestion)), JSON, []

    # ------------------------------------------------------------------ page, docs, health

    def _asset(self, name: str, path: Path) -> tuple[bytes, bytes]:
        cached = self._assets.get(name)
        if cached is None:
            cached = self._assets[name] = (path.read_bytes(), _CONTENT_TYPES.get(path.suffix, b"application/octet-stream"))
        return cached

    async def _page(self, request: Request) -> tuple[int, bytes, bytes, list]:
        body, ctype = self._asset("index.html", STATIC / "index.html")
        return 200, body, ctype, [(b"content-security-policy", _PAGE_CSP), (b"cache-control", b"no-cache")]

    async def _static(self, request: Request) -> tuple[int, bytes, bytes, list]:
        name = request.path.rsplit("/", 1)[1]
        file = STATIC / ("docs-init.js" if request.path == "/docs/init.js" else name)
        body, ctype = self._asset(request.path, file)
        return 200, body, ctype, [(b"cache-control", b"max-age=300")]

    async def _favicon(self, request: Request) -> tuple[int, bytes, bytes, list]:
        return 204, b"", b"image/x-icon", [(b"cache-control", b"max-age=86400")]

    async def _docs(self, request: Request) -> tuple[int, bytes, bytes, list]:
        body, ctype = self._asset("docs.html", STATIC / "docs.html")
        return 200, body, ctype, [(b"content-security-policy", _DOCS_CSP)]

    async def _swagger_asset(self, request: Request) -> tuple[int, bytes, bytes, list]:
        from swagger_ui_bundle import swagger_ui_path

        name = request.path.rsplit("/", 1)[1]
        body, ctype = self._asset(request.path, Path(swagger_ui_path) / name)
        return 200, body, ctype, [(b"cache-control", b"max-age=86400")]

    async def _openapi(self, request: Request) -> tuple[int, bytes, bytes, list]:
        return 200, self._openapi_json, JSON, []

    async def _healthz(self, request: Request) -> tuple[int, bytes, bytes, list]:
        if not self._alive():
            return 503, b"scoring engine stopped\n", b"text/plain; charset=utf-8", []
        return 200, b"ok\n", b"text/plain; charset=utf-8", []

    def not_ready(self) -> str | None:
        if self.shutting_down:
            return "shutting down"
        try:
            return self._engine_not_ready()
        except Exception as exc:  # noqa: BLE001 - a failing check is itself a reason not to be ready
            return f"readiness check failed: {exc}"

    async def _readyz(self, request: Request) -> tuple[int, bytes, bytes, list]:
        reason = self.not_ready()
        self.metrics.ready.set(1 if reason is None else 0)
        if reason is None:
            return 200, b"ready\n", b"text/plain; charset=utf-8", []
        return 503, reason.encode("utf-8", "replace") + b"\n", b"text/plain; charset=utf-8", []

    async def _metrics(self, request: Request) -> tuple[int, bytes, bytes, list]:
        self.metrics.ready.set(1 if self.not_ready() is None else 0)
        return 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode(), []


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"the request body is {size} bytes, the limit is {limit} (ESP_API_MAX_BODY_BYTES)",
        perspective_type="COMMENT_TOO_LONG", metadata={"limit": limit},
    )


async def _send(
    send: Callable[[dict], Awaitable[None]], status: int, body: bytes, content_type: bytes | None,
    headers: list[tuple[bytes, bytes]], request: Request,
) -> None:
    elapsed_ms = (time.perf_counter() - request.started) * 1000
    all_headers = [(b"content-length", str(len(body)).encode()), (b"server-timing", f"app;dur={elapsed_ms:.1f}".encode())]
    if content_type is not None:
        all_headers.append((b"content-type", content_type))
    all_headers += _COMMON_HEADERS
    all_headers += headers
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": b"" if request.method == "HEAD" else body})
