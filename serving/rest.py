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
import urllib.parse
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from esp.http_endpoint import HttpEndpoint, Reply, metrics_route
from serving.saved_model_files import MAX_VERSION

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
__all__ = ["HttpEndpoint", "Reply", "model_route", "metrics_route"]


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
            if int(version) > MAX_VERSION:  # the field is an int64
                return error_reply(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to convert version: {version[:40]}")
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
