"""The HTTP side of `esp serve`: TF Serving's REST model status and metadata, and Prometheus pages.

Kubernetes probes TF Serving over REST (`GET /v1/models/bert`) and Prometheus scrapes the path of
its `--monitoring_config_file`. `esp serve` answers the same URLs the same way, so the production
Deployment's probes and scrape settings can be run against it on a machine without TF Serving:
- `GET /v1/models/NAME[/versions/N | /labels/L]` is GetModelStatus as JSON, and `.../metadata`
  is GetModelMetadata (signature_def) as JSON, both with TF Serving's field names;
- errors answer `{"error": "..."}` with TF Serving's HTTP code for the gRPC status (NOT_FOUND 404,
  INVALID_ARGUMENT 400...); a path under /v1/ that is not a status or metadata path is a 400
  "Malformed request", any other path a 404;
- while the server is failing (a supervised thread died, see serving.server), every status and
  metadata request answers 503, so a probe fails as the gRPC health check does.

Only GET is served: Predict stays on gRPC, where ESP's clients are.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format

from esp.errors import ConfigError

log = logging.getLogger(__name__)

# TF Serving's own pattern for GET requests (model_servers/http_rest_api_util.cc).
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
REST_PREFIX = re.compile(r"/v1/.*", re.I)

# TF Serving's mapping from a status code to an HTTP status (model_servers/http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

JSON = "application/json"
# What a route answers: HTTP status, content type, body.
Reply = tuple[int, str, bytes]


def error_reply(code: grpc.StatusCode, message: str) -> Reply:
    return HTTP_STATUS.get(code, 500), JSON, json.dumps({"error": message}, indent=1).encode()


def status_json(response: Any) -> bytes:
    """GetModelStatusResponse as TF Serving prints it (every field, enum names, int64 as strings)."""
    return json_format.MessageToJson(response, indent=1, always_print_fields_with_no_presence=True).encode()


def metadata_json(response: Any) -> bytes:
    """GetModelMetadataResponse as TF Serving prints it: model_spec, then metadata.signature_def unpacked."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    body = {
        "model_spec": json_format.MessageToDict(
            response.model_spec, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
        "metadata": {
            "signature_def": json_format.MessageToDict(
                signature_map, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        },
    }
    return json.dumps(body, indent=1).encode()


def model_route(
    status: Callable[[Any], Any],
    metadata: Callable[[Any], Any],
    failure: Callable[[], str | None],
    request_error: type[Exception],
) -> Callable[[str], Reply | None]:
    """Answers the status and metadata paths with the gRPC servicer's own methods.

    `status` and `metadata` take the gRPC request message and return the response (raising
    `request_error`, which carries `.code` and `.message`); `failure()` is the reason the server
    is failing, or None.
    """
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

    def route(path: str) -> Reply | None:
        match = STATUS_PATH.fullmatch(path)
        if match is None:
            if REST_PREFIX.fullmatch(path):
                return error_reply(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: GET {path}")
            return None
        reason = failure()
        if reason is not None:
            return error_reply(grpc.StatusCode.UNAVAILABLE, f"esp serve is failing: {reason}")
        name, version, label, subresource = match.groups()
        if not name:
            return error_reply(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name in request.")
        is_metadata = subresource is not None
        request: Any
        if is_metadata:
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        else:
            request = get_model_status_pb2.GetModelStatusRequest()
        spec = request.model_spec
        spec.name = urllib.parse.unquote(name)
        if version is not None:
            spec.version.value = int(version)
        if label is not None:
            spec.version_label = urllib.parse.unquote(label)
        try:
            if is_metadata:
                return 200, JSON, metadata_json(metadata(request))
            return 200, JSON, status_json(status(request))
        except request_error as exc:
            error: Any = exc
            return error_reply(error.code, error.message)

    return route


class HttpEndpoint:
    """One HTTP port answering GET through routes; runs on a thread that the server supervises.

    A route returns a Reply, or None to let the next route try; no route answering is a 404.
    Binding happens in the constructor, so a port in use is a ConfigError at start-up.
    """

    def __init__(self, name: str, host: str, port: int, routes: list[Callable[[str], Reply | None]]) -> None:
        self.name = name
        self._routes = routes
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = urllib.parse.urlsplit(self.path).path
                try:
                    reply = endpoint.answer(path)
                except Exception:  # a bug in a route answers 500 and is logged; the endpoint stays up
                    log.exception("%s: GET %s failed", endpoint.name, path)
                    reply = error_reply(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
                code, content_type, body = reply
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                # Probes and scrapes call every few seconds; their access log is noise.
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for the {name}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self.thread = threading.Thread(target=self._server.serve_forever, name=f"esp-serve-{name}", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def answer(self, path: str) -> Reply:
        for route in self._routes:
            reply = route(path)
            if reply is not None:
                return reply
        return 404, "text/plain; charset=utf-8", b""

    def start(self) -> HttpEndpoint:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def metrics_route(path: str, page: Callable[[], bytes]) -> Callable[[str], Reply | None]:
    """Serves Prometheus's text format at exactly `path`."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def route(requested: str) -> Reply | None:
        return (200, CONTENT_TYPE_LATEST, page()) if requested == path else None

    return route
