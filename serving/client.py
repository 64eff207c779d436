"""The TF Serving gRPC client: ESP's `Scorer` for a model behind TF Serving (or `esp serve`).

It speaks TF Serving's PredictionService/ModelService over gRPC with ESP's own wire-compatible
messages (`serving.esp_tfs_pb2`), so importing it never loads TensorFlow: a worker pod that only
forwards strings does not pay TensorFlow's ~6 s and ~600 MiB. Methods are called by their TF
Serving path, so the proto package name (`esp_tfs`) never reaches the wire.

Behaviour, all configurable through `esp.settings.ModelClientSettings`:
- one gRPC channel per (target, TLS, options) per process, shared by every scorer and reused;
- round-robin over every address the target resolves to (`dns:///tf-serving.NS.svc.cluster.local:8500`
  behind a headless Service, or `ipv4:HOST:PORT,HOST:PORT`), so each TF Serving replica takes a
  share; the server's max connection age makes the channel resolve again and find new replicas;
- a deadline on every call; retries only for RETRYABLE_CODES, capped exponential backoff with
  full jitter, inside an overall budget; after it, ModelUnavailable;
- NOT_FOUND -> ModelNotFound, INVALID_ARGUMENT -> ModelRejected (except the two INVALID_ARGUMENTs
  TF Serving uses for a bad version label or signature name, which are configuration, not input);
  RESOURCE_EXHAUSTED for a message over gRPC's size limit -> ModelRejected (the batch is too big,
  not the server too busy); INTERNAL, UNKNOWN -> ModelServerError (an op that broke: on one input,
  or on every input; the caller's canary decides which); anything else after the retries ->
  ModelUnavailable;
- labels come from GetModelMetadata's signature_def, cached per model version, never hard-coded.
"""

from __future__ import annotations

import array
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from esp.contracts import labels_from_outputs
from esp.errors import ConfigError
from esp.scoring import (
    ModelContractError,
    ModelNotFound,
    ModelOutput,
    ModelRejected,
    ModelServerError,
    ModelUnavailable,
    ScoringError,
)
from serving import esp_tfs_pb2 as pb

log = logging.getLogger(__name__)

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA_METHOD = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS_METHOD = "/tensorflow.serving.ModelService/GetModelStatus"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"

# Status codes that say "the server, not the request": worth another attempt within the budget.
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)

# TF Serving answers these when an op fails while running the model: one input may trip it (a query
# of death) as well as a broken version. Never an outage by themselves (ModelServerError).
AMBIGUOUS_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

# TF Serving answers INVALID_ARGUMENT for these, but they are a misconfigured client or server,
# not a bad comment: treating them as ModelRejected would dead-letter every message.
_CONFIG_ERROR_MARKERS = ("Unrecognized servable version label", "signature key", "signature_name")

# gRPC answers RESOURCE_EXHAUSTED both for a server out of capacity (retry) and for a message over
# the size limit of either side, which no retry fixes; this is how the second reads.
_TOO_LARGE_MARKER = "larger than max"


def _too_large(code: grpc.StatusCode, details: str) -> bool:
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE_MARKER in details.lower()


INPUT_KEY = "text"
THRESHOLD_PREFIX = "esp_threshold_"
TRUNCATED_KEY = "esp_truncated"
DEFAULT_THRESHOLD = 0.5
SIGNATURE_DEF_FIELD = "signature_def"

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# tensor_content is little-endian; array typecodes per dtype for the numeric types ESP reads.
_CONTENT_TYPECODES = {
    pb.DT_FLOAT: "f",
    pb.DT_DOUBLE: "d",
    pb.DT_INT32: "i",
    pb.DT_INT64: "q",
    pb.DT_UINT8: "B",
    pb.DT_INT8: "b",
}
_VALUE_FIELDS = {
    pb.DT_FLOAT: "float_val",
    pb.DT_DOUBLE: "double_val",
    pb.DT_INT32: "int_val",
    pb.DT_INT16: "int_val",
    pb.DT_INT8: "int_val",
    pb.DT_UINT8: "int_val",
    pb.DT_INT64: "int64_val",
    pb.DT_BOOL: "bool_val",
    pb.DT_STRING: "string_val",
}


# ---------------------------------------------------------------------------------------------
# Tensors


def string_tensor(texts: Sequence[str]) -> pb.TensorProto:
    """A DT_STRING [batch] tensor of UTF-8 texts, as TF Serving's docs build one."""
    tensor = pb.TensorProto(dtype=pb.DT_STRING)
    tensor.tensor_shape.dim.add(size=len(texts))
    tensor.string_val.extend(t.encode("utf-8") for t in texts)
    return tensor


def tensor_shape(tensor: pb.TensorProto) -> list[int]:
    return [d.size for d in tensor.tensor_shape.dim]


def tensor_values(tensor: pb.TensorProto, max_elements: int | None = None) -> list[Any]:
    """The flat values of a tensor, from tensor_content or the typed *_val field, without numpy.

    `max_elements`: refuse a shape declaring more, before anything is expanded (a compact tensor
    declaring 2**32 elements with one value would otherwise be filled out in memory).
    """
    count = 1
    for size in tensor_shape(tensor):
        count *= size
    if max_elements is not None and count > max_elements:
        raise ModelContractError(f"tensor of shape {tensor_shape(tensor)} declares more than the {max_elements} element(s) expected")
    if tensor.tensor_content:
        if tensor.dtype == pb.DT_BOOL:
            values: list[Any] = [b != 0 for b in tensor.tensor_content]
        elif tensor.dtype in _CONTENT_TYPECODES:
            arr = array.array(_CONTENT_TYPECODES[tensor.dtype])
            arr.frombytes(tensor.tensor_content)
            if sys.byteorder == "big":
                arr.byteswap()
            values = arr.tolist()
        else:
            raise ModelContractError(f"cannot decode tensor_content of dtype {tensor.dtype}")
    else:
        field = _VALUE_FIELDS.get(tensor.dtype)
        if field is None:
            raise ModelContractError(f"cannot decode a tensor of dtype {tensor.dtype}")
        values = list(getattr(tensor, field))
        # TensorProto's compact form: fewer values than elements means "repeat the last one".
        if 0 < len(values) < count:
            values.extend([values[-1]] * (count - len(values)))
    if len(values) != count:
        raise ModelContractError(f"tensor of shape {tensor_shape(tensor)} carries {len(values)} values")
    return values


# ---------------------------------------------------------------------------------------------
# Channels: one per (target, credentials, options) per process, shared and reference-counted.


class _SharedChannels:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[tuple, list[Any]] = {}  # key -> [channel, refcount]

    def acquire(self, target: str, root_certificates: bytes | None, options: tuple[tuple[str, Any], ...]) -> tuple[tuple, grpc.Channel]:
        key = (target, root_certificates, options)
        with self._lock:
            entry = self._channels.get(key)
            if entry is None:
                if root_certificates is not None:
                    creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                    channel = grpc.secure_channel(target, creds, options=list(options))
                else:
                    channel = grpc.insecure_channel(target, options=list(options))
                entry = self._channels[key] = [channel, 0]
            entry[1] += 1
            return key, entry[0]

    def release(self, key: tuple) -> None:
        with self._lock:
            entry = self._channels.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._channels[key]
                entry[0].close()


_CHANNELS = _SharedChannels()


LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")


def channel_options(
    max_message_bytes: int,
    keepalive_s: float,
    load_balancing: str = "round_robin",
    tls_server_name: str | None = None,
) -> tuple[tuple[str, Any], ...]:
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING_POLICIES}, not {load_balancing!r}")
    server_name = (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
    return server_name + (
        ("grpc.lb_policy_name", load_balancing),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Reconnect quickly after a model server restarts (gRPC's default backoff grows to 120 s,
        # which would keep a recovered server idle long after it came back).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    )


# ---------------------------------------------------------------------------------------------
# The scorer


class TFServingScorer:
    """Scores texts with a model on TF Serving's gRPC API; implements esp.scoring.Scorer.

    `target` is host:port. Pick the version with `model_version` (an integer) or `version_label`
    (`stable`, `canary`), or neither for the server's latest. Thread-safe: one instance can serve
    many threads. `close()` releases the shared channel.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8500",
        *,
        model_name: str = "bert",
        model_version: int | None = None,
        version_label: str | None = None,
        signature_name: str = "serving_default",
        timeout_s: float = 10.0,
        retry_budget_s: float = 30.0,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        root_certificates: bytes | None = None,
        call_metadata: Sequence[tuple[str, str]] = (),
        keepalive_s: float = 60.0,
        load_balancing: str = "round_robin",
        tls_server_name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if model_version is not None and version_label is not None:
            raise ValueError("give model_version or version_label, not both")
        self.target = target
        self.model_name = model_name
        self.model_version = model_version
        self.version_label = version_label
        self.signature_name = signature_name
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata = tuple(call_metadata)
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random()  # nosec B311: retry jitter, not a secret
        self._labels: dict[int, tuple[str, ...]] = {}
        self._labels_lock = threading.Lock()
        self._closed = False
        self._channel_key, channel = _CHANNELS.acquire(
            target, root_certificates, channel_options(max_message_bytes, keepalive_s, load_balancing, tls_server_name)
        )
        self._predict = channel.unary_unary(
            PREDICT_METHOD,
            request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString,
        )
        self._get_metadata = channel.unary_unary(
            GET_MODEL_METADATA_METHOD,
            request_serializer=pb.GetModelMetadataRequest.SerializeToString,
            response_deserializer=pb.GetModelMetadataResponse.FromString,
        )
        self._get_status = channel.unary_unary(
            GET_MODEL_STATUS_METHOD,
            request_serializer=pb.GetModelStatusRequest.SerializeToString,
            response_deserializer=pb.GetModelStatusResponse.FromString,
        )

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> TFServingScorer:
        """Builds a scorer from `esp.settings.ModelClientSettings` (keyword overrides win)."""
        root = None
        if settings.model_tls_root_certs:
            try:
                with open(settings.model_tls_root_certs, "rb") as f:
                    root = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read TLS root certificates {settings.model_tls_root_certs}: {exc.strerror}") from None
        kwargs: dict[str, Any] = dict(
            model_name=settings.model_name,
            model_version=settings.model_version,
            version_label=settings.model_version_label,
            signature_name=settings.model_signature,
            timeout_s=settings.model_timeout_s,
            retry_budget_s=settings.model_retry_budget_s,
            initial_backoff_s=settings.model_retry_initial_backoff_s,
            max_backoff_s=settings.model_retry_max_backoff_s,
            max_message_bytes=settings.model_max_message_bytes,
            root_certificates=root,
            call_metadata=settings.call_metadata(),
            keepalive_s=settings.model_keepalive_s,
            load_balancing=settings.model_load_balancing,
            tls_server_name=settings.model_tls_server_name,
        )
        kwargs.update(overrides)
        return cls(settings.model_server, **kwargs)

    # -- description ------------------------------------------------------------------------

    def describe(self) -> str:
        """What this scorer asks for, and where: used in every error message."""
        if self.model_version is not None:
            which = f" version {self.model_version}"
        elif self.version_label is not None:
            which = f" label {self.version_label!r}"
        else:
            which = " (latest)"
        return f"model {self.model_name!r}{which} signature {self.signature_name!r} at {self.target}"

    def __repr__(self) -> str:
        return f"TFServingScorer({self.describe()})"

    def _model_spec(self, spec: pb.ModelSpec, version: int | None = None) -> None:
        spec.name = self.model_name
        spec.signature_name = self.signature_name
        if version is not None:
            spec.version.value = version
        elif self.model_version is not None:
            spec.version.value = self.model_version
        elif self.version_label is not None:
            spec.version_label = self.version_label

    # -- calls ------------------------------------------------------------------------------

    def _call(self, what: str, method: Callable, request: Any, *, retry: bool = True, timeout_s: float | None = None) -> Any:
        """One RPC with a deadline; retryable codes are retried inside the budget."""
        if self._closed:
            raise ModelUnavailable(f"{what} for {self.describe()}: the scorer is closed")
        per_call = timeout_s if timeout_s is not None else self.timeout_s
        budget_end = self._clock() + (self.retry_budget_s if retry else 0.0)
        attempt = 0
        while True:
            attempt += 1
            remaining = budget_end - self._clock()
            timeout = per_call if attempt == 1 else min(per_call, max(remaining, 0.001))
            try:
                return method(request, timeout=timeout, metadata=self._metadata or None)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
                if code not in RETRYABLE_CODES or _too_large(code, details):
                    raise self._classify(what, code, details) from None
                backoff = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
                backoff *= self._rng.random()
                if not retry or self._clock() + backoff >= budget_end:
                    raise ModelUnavailable(
                        f"{what} for {self.describe()}: {code.name} after {attempt} attempt(s) "
                        f"within a {self.retry_budget_s if retry else per_call:g} s budget: {details}"
                    ) from None
                log.debug("%s: %s (attempt %d), retrying in %.3f s", what, code.name, attempt, backoff)
                self._sleep(backoff)

    def _classify(self, what: str, code: grpc.StatusCode, details: str) -> ScoringError:
        message = f"{what} for {self.describe()}: {code.name}: {details}"
        if code == grpc.StatusCode.NOT_FOUND:
            return ModelNotFound(message)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            if any(marker in details for marker in _CONFIG_ERROR_MARKERS):
                return ModelNotFound(message)
            return ModelRejected(message)
        if _too_large(code, details):
            # The request is over a gRPC message limit (this channel's or the server's): the batch's
            # size, not the server's state. A smaller batch may pass; one comment alone is refused.
            return ModelRejected(message)
        if code in AMBIGUOUS_CODES:
            return ModelServerError(message)
        # UNIMPLEMENTED, UNAUTHENTICATED, PERMISSION_DENIED...: the server or its configuration, not the input.
        return ModelUnavailable(message)

    # -- metadata ---------------------------------------------------------------------------

    def labels(self, version: int | None = None) -> tuple[str, ...]:
        """The labels of a model version (default: the one this scorer targets), from GetModelMetadata."""
        if version is not None:
            with self._labels_lock:
                cached = self._labels.get(version)
            if cached is not None:
                return cached
        resolved, labels = self._fetch_labels(version)
        return labels

    def _fetch_labels(self, version: int | None) -> tuple[int, tuple[str, ...]]:
        request = pb.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
        self._model_spec(request.model_spec, version)
        response = self._call("GetModelMetadata", self._get_metadata, request)
        resolved = response.model_spec.version.value if response.model_spec.HasField("version") else version
        packed = response.metadata.get(SIGNATURE_DEF_FIELD)
        if packed is None:
            raise ModelContractError(f"GetModelMetadata for {self.describe()} returned no signature_def")
        signatures = pb.SignatureDefMap.FromString(packed.value)
        if self.signature_name not in signatures.signature_def:
            raise ModelNotFound(
                f"{self.describe()}: the model has no signature {self.signature_name!r} "
                f"(it has {sorted(signatures.signature_def)})"
            )
        signature = signatures.signature_def[self.signature_name]
        labels = tuple(labels_from_outputs(list(signature.outputs)))
        if not labels:
            raise ModelContractError(f"{self.describe()}: signature declares no label outputs")
        if resolved is not None:
            with self._labels_lock:
                self._labels[resolved] = labels
        return resolved if resolved is not None else 0, labels

    def check_ready(self, timeout_s: float | None = None) -> int:
        """Readiness: the targeted model version answers metadata. Returns its version.

        One attempt, no retries (a readiness probe should say "not now" quickly). Raises
        ModelUnavailable when the server is unreachable, ModelNotFound when it does not serve
        what this scorer asks for. Also fills the label cache for that version.
        """
        request = pb.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
        self._model_spec(request.model_spec)
        response = self._call("GetModelMetadata", self._get_metadata, request, retry=False, timeout_s=timeout_s)
        version = response.model_spec.version.value
        packed = response.metadata.get(SIGNATURE_DEF_FIELD)
        if packed is not None:
            signatures = pb.SignatureDefMap.FromString(packed.value)
            if self.signature_name not in signatures.signature_def:
                raise ModelNotFound(f"{self.describe()}: the model has no signature {self.signature_name!r}")
            labels = tuple(labels_from_outputs(list(signatures.signature_def[self.signature_name].outputs)))
            with self._labels_lock:
                self._labels[version] = labels
        return version

    def model_status(self) -> list[tuple[int, str]]:
        """GetModelStatus: (version, state name) for each version the server knows."""
        request = pb.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        if self.model_version is not None:
            request.model_spec.version.value = self.model_version
        response = self._call("GetModelStatus", self._get_status, request)
        return [
            (s.version, pb.ModelVersionStatus.State.Name(s.state)) for s in response.model_version_status
        ]

    # -- predict ----------------------------------------------------------------------------

    def predict(self, texts: Sequence[str]) -> ModelOutput:
        """Scores texts; rows of the result align with `texts`. An empty batch is a valid call."""
        request = pb.PredictRequest()
        self._model_spec(request.model_spec)
        request.inputs[INPUT_KEY].CopyFrom(string_tensor(texts))
        response = self._call("Predict", self._predict, request)
        return self._to_output(response, len(texts))

    def _to_output(self, response: pb.PredictResponse, n: int) -> ModelOutput:
        if not response.model_spec.HasField("version"):
            raise ModelContractError(f"Predict for {self.describe()}: the response names no model version")
        version = response.model_spec.version.value
        outputs = response.outputs
        with self._labels_lock:
            labels = self._labels.get(version)
        if labels is None:
            try:
                labels = self.labels(version)
            except ModelNotFound:
                # The version that answered was unloaded in between (a label moved): its response
                # carries every signature output, so the labels are still known exactly.
                labels = tuple(labels_from_outputs(list(outputs)))
                log.info("model %s version %d gone before its metadata was read; labels from the response", self.model_name, version)
        columns = []
        for label in labels:
            if label not in outputs:
                raise ModelContractError(f"{self.describe()} v{version}: no output for label {label!r}")
            values = tensor_values(outputs[label], max_elements=max(n, 1))
            if len(values) != n:
                raise ModelContractError(
                    f"{self.describe()} v{version}: output {label!r} has {len(values)} rows for {n} texts"
                )
            columns.append(values)
        thresholds = {}
        for label in labels:
            key = THRESHOLD_PREFIX + label
            values = tensor_values(outputs[key], max_elements=max(n, 1)) if key in outputs else []
            thresholds[label] = float(values[0]) if values else DEFAULT_THRESHOLD
        if TRUNCATED_KEY in outputs:
            truncated = [bool(v) for v in tensor_values(outputs[TRUNCATED_KEY], max_elements=max(n, 1))]
        else:
            truncated = [False] * n
        probabilities = [tuple(row) for row in zip(*columns)] if n else []
        return ModelOutput(
            model_name=self.model_name,
            model_version=version,
            labels=labels,
            probabilities=probabilities,
            thresholds=thresholds,
            truncated=truncated,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _CHANNELS.release(self._channel_key)

    def __enter__(self) -> TFServingScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def health_check(
    target: str,
    *,
    service: str = "",
    timeout_s: float = 1.0,
    root_certificates: bytes | None = None,
    tls_server_name: str | None = None,
) -> bool:
    """gRPC health protocol: True when the server at `target` reports SERVING (one short call)."""
    if root_certificates is not None:
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else None
        channel_cm = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_certificates), options=options)
    else:
        channel_cm = grpc.insecure_channel(target)
    with channel_cm as channel:
        check = channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=pb.HealthCheckRequest.SerializeToString,
            response_deserializer=pb.HealthCheckResponse.FromString,
        )
        try:
            response = check(pb.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return response.status == pb.HealthCheckResponse.SERVING
