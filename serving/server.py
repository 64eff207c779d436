"""`esp serve`: a local model server that speaks TF Serving's gRPC API with the real TF runtime.

TF Serving itself cannot be installed on ESP's development machines, so this server stands in for
it in tests, the demo and benchmarks. It serves the same SavedModels through the same protocol
(tensorflow-serving-api's messages and service definitions), so the client in `serving.client` is
the same code against both:
- PredictionService.Predict and GetModelMetadata, ModelService.GetModelStatus, and the standard
  gRPC health service;
- TF Serving's version policies (latest N by default; `all` or `specific` versions with labels
  from a models.config), polled on disk; a new version is loaded and warmed up (its
  `assets.extra/tf_serving_warmup_requests`) before it takes traffic, and a request in flight
  keeps the version it started with, so a swap fails nothing;
- TF Serving's status codes: INVALID_ARGUMENT for a request that does not fit the signature or
  that the graph rejects, NOT_FOUND for an unknown model or version;
- TF Serving's REST model status and metadata, and its Prometheus page (serving.rest), so the
  production Deployment's probes and scrape settings can be exercised against it;
- TF Serving's --grpc_channel_arguments (e.g. grpc.max_connection_age_ms, which makes clients
  reconnect and re-resolve, so replicas added by an autoscaler get traffic) and --ssl_config_file;
- optional server-side batching (serving.batching); Prometheus metrics; clean SIGTERM.

Supervised: the gRPC server, the model poller and the HTTP endpoints must stay up while the server
runs. If one dies, the gRPC health check answers NOT_SERVING, REST status answers 503, and
`serve_forever` returns the reason, so `esp serve` exits non-zero and Kubernetes restarts it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from esp.errors import ConfigError
from serving import esp_tfs_pb2, rest
from serving.batching import BatchingError, BatchingOptions, BatchScheduler
from serving.model_config import ModelSource, read_model_config
from serving.saved_model import LoadedModel, SignatureError
from serving.saved_model_files import DEFAULT_SIGNATURE, version_dirs

log = logging.getLogger(__name__)

# TF Serving reads at most this many warmup records per version.
MAX_WARMUP_RECORDS = 1000
# TF Serving retries a failed load a few times before giving up on that version.
MAX_LOAD_ATTEMPTS = 5
SIGNATURE_DEF_FIELD = "signature_def"
HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_SERVICE_NAMES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

_NP_TO_DT = {
    np.dtype(np.float32): (types_pb2.DT_FLOAT, "float_val"),
    np.dtype(np.float64): (types_pb2.DT_DOUBLE, "double_val"),
    np.dtype(np.int32): (types_pb2.DT_INT32, "int_val"),
    np.dtype(np.int64): (types_pb2.DT_INT64, "int64_val"),
    np.dtype(np.bool_): (types_pb2.DT_BOOL, "bool_val"),
}


# A status message quotes what the client sent (a model name, a label, an input key); a client
# refuses a status header over 16 KiB, and would then see RESOURCE_EXHAUSTED, which it retries,
# instead of the NOT_FOUND or INVALID_ARGUMENT it should act on. TF Serving cuts at 1024 too.
MAX_STATUS_MESSAGE = 1024


def _status_message(message: str) -> str:
    return message if len(message) <= MAX_STATUS_MESSAGE else message[: MAX_STATUS_MESSAGE - 12] + "...TRUNCATED"


class RequestError(Exception):
    """A request answered with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def to_tensor_proto(value: np.ndarray) -> tensor_pb2.TensorProto:
    """Numpy to TensorProto in TF Serving's response form (typed *_val fields, not tensor_content)."""
    proto = tensor_pb2.TensorProto()
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    if value.dtype.kind in "OSU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in value.reshape(-1))
        return proto
    dtype, field = _NP_TO_DT.get(value.dtype, (None, None))
    if dtype is None:
        return tf.make_tensor_proto(value)
    proto.dtype = dtype
    getattr(proto, field).extend(value.reshape(-1).tolist())
    return proto


def _declared_elements(key: str, proto: tensor_pb2.TensorProto) -> int:
    count = 1  # Python ints: dimensions that overflow int64 when multiplied are refused, not wrapped
    for dim in proto.tensor_shape.dim:
        if dim.size < 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} has a negative dimension ({dim.size})")
        count *= dim.size
    return count


def from_tensor_proto(key: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The request's tensor as an array; it must carry every element its shape declares.

    TensorFlow fills a tensor whose *_val list is shorter than its shape with copies of the last
    value. From a client that is an amplifier: twenty bytes declaring 2**32 strings make
    tf.make_ndarray build a list of 2**32 items and exhaust the server's memory. No ESP client relies
    on the fill, so a request must carry what it declares. A
    tensor_content buffer is checked by make_ndarray itself (its length must match the shape).
    """
    if not proto.tensor_content:
        declared = _declared_elements(key, proto)
        carried = sum(len(value) for field, value in proto.ListFields() if field.name.endswith("_val"))
        if declared != carried:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {key!r} declares {declared} element(s) in its shape but carries {carried} value(s)",
            )
    try:
        return tf.make_ndarray(proto)
    except Exception as exc:  # any malformed tensor is the request's fault
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} is not a valid tensor: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics of the server, with units in their names, in the server's own registry.

    Also TF Serving's `:tensorflow:serving:request_count{model_name, status}` under its own name, so
    alerts written for TF Serving's model error rate read the same series from `esp serve`.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("esp_serve_requests_total", "gRPC requests answered", ["method", "code"], registry=registry)
        self.latency = Histogram(
            "esp_serve_request_latency_seconds",
            "Time to answer one gRPC request",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.rows = Counter("esp_serve_predict_rows_total", "Rows (texts) predicted", ["model"], registry=registry)
        self.batch_rows = Histogram(
            "esp_serve_batch_rows", "Rows per executed server-side batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.loads = Counter("esp_serve_model_loads_total", "Model version loads", ["model", "outcome"], registry=registry)
        self.versions = Gauge("esp_serve_model_versions_available", "Model versions taking traffic", ["model"], registry=registry)
        self.tf_serving_requests = TFServingRequestCount()
        registry.register(self.tf_serving_requests)

    def page(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class TFServingRequestCount:
    """TF Serving's request counter, exposed under TF Serving's exact name and labels.

    prometheus_client appends `_total` to a counter's name in its HELP and TYPE lines while TF
    Serving's exporter does not, so this is exposed untyped: the sample lines are TF Serving's own.
    """

    NAME = ":tensorflow:serving:request_count"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def inc(self, model_name: str, status: str) -> None:
        with self._lock:
            self._counts[(model_name, status)] = self._counts.get((model_name, status), 0) + 1

    def collect(self) -> Any:
        from prometheus_client.metrics_core import Metric

        metric = Metric(self.NAME, "The total number of requests.", "unknown")
        with self._lock:
            for (model_name, status), value in sorted(self._counts.items()):
                metric.add_sample(self.NAME, {"model_name": model_name, "status": status}, value)
        yield metric


# ---------------------------------------------------------------------------------------------
# Models and versions


@dataclasses.dataclass
class VersionState:
    state: int
    error_code: int = 0
    error_message: str = ""


class ServedModel:
    """The versions of one model: loads, warms up, publishes, and unloads them per its policy."""

    def __init__(self, source: ModelSource, metrics: Metrics | None) -> None:
        self.source = source
        self._metrics = metrics
        self._lock = threading.Lock()
        self._available: dict[int, LoadedModel] = {}
        self._states: dict[int, VersionState] = {}
        # Failed loads per version, with the identity of the directory they failed on: a version
        # copied in again (a half-written upload replaced by a whole one) is tried afresh.
        self._failures: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._said_none = False

    @property
    def name(self) -> str:
        return self.source.name

    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._available)

    def update_source(self, source: ModelSource) -> None:
        with self._lock:
            if source.labels != self.source.labels:
                log.info("model %s: version labels now %s", source.name, source.labels)
            self.source = source

    def reconcile(self) -> None:
        """Brings the loaded versions in line with the disk and the policy (one polling pass)."""
        source = self.source
        dirs = version_dirs(source.base_path)
        if not dirs and not self._said_none:
            log.warning(
                "model %s: no versions under %s (a version is a directory named by its number, e.g. %s/1, "
                "holding saved_model.pb)", source.name, source.base_path, source.base_path.rstrip("/"),
            )
        self._said_none = not dirs
        for version in [v for v in self._failures if v not in dirs or self._failures[v][1] != _identity(dirs[v])]:
            del self._failures[version]  # gone, or copied in again: worth new attempts
        desired = source.desired(sorted(dirs))
        for version in sorted(desired - set(self.available_versions()), reverse=True):
            if self._failures.get(version, (0, ()))[0] >= MAX_LOAD_ATTEMPTS:
                continue
            self._load(version, dirs[version])
        with self._lock:
            # Unload only once a wanted version is available: availability is never interrupted.
            if desired & set(self._available):
                for version in sorted(set(self._available) - desired):
                    del self._available[version]
                    self._states[version] = VersionState(get_model_status_pb2.ModelVersionStatus.END)
                    log.info("model %s: unloaded version %d", source.name, version)
            if self._metrics:
                self._metrics.versions.labels(source.name).set(len(self._available))
            for label, version in source.labels.items():
                if version not in self._available:
                    log.warning("model %s: label %r points at version %d, which is not available", source.name, label, version)

    def _load(self, version: int, path: Path) -> None:
        with self._lock:
            self._states[version] = VersionState(get_model_status_pb2.ModelVersionStatus.LOADING)
        started = time.monotonic()
        try:
            model = LoadedModel(path, version)
            warmed = warm_up(model)
        except Exception as exc:
            self._failures[version] = (self._failures.get(version, (0, ()))[0] + 1, _identity(path))
            code = exc.error_code if isinstance(exc, tf.errors.OpError) else grpc.StatusCode.UNKNOWN.value[0]
            with self._lock:
                self._states[version] = VersionState(get_model_status_pb2.ModelVersionStatus.END, code, str(exc))
            if self._metrics:
                self._metrics.loads.labels(self.name, "failed").inc()
            log.error("model %s: loading version %d from %s failed (attempt %d): %s", self.name, version, path, self._failures[version][0], exc)
            return
        with self._lock:
            self._available[version] = model
            self._states[version] = VersionState(get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        if self._metrics:
            self._metrics.loads.labels(self.name, "loaded").inc()
        log.info(
            "model %s: version %d available (loaded in %.2f s, %d warmup requests)",
            self.name, version, time.monotonic() - started, warmed,
        )

    def resolve(self, spec: Any) -> LoadedModel:
        """The loaded version a ModelSpec asks for (version, label, or latest)."""
        which = spec.WhichOneof("version_choice")
        with self._lock:
            if which == "version":
                model = self._available.get(spec.version.value)
                if model is None:
                    raise RequestError(
                        grpc.StatusCode.NOT_FOUND,
                        f"Servable not found for request: Specific({self.name}, {spec.version.value})",
                    )
                return model
            if which == "version_label":
                label = spec.version_label
                if label not in self.source.labels:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
                    )
                version = self.source.labels[label]
                model = self._available.get(version)
                if model is None:
                    raise RequestError(
                        grpc.StatusCode.NOT_FOUND,
                        f"Servable not found for request: Specific({self.name}, {version}) (label {label!r})",
                    )
                return model
            if not self._available:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({self.name})")
            return self._available[max(self._available)]

    def statuses(self, version: int | None) -> list[tuple[int, VersionState]]:
        with self._lock:
            if version is not None:
                state = self._states.get(version)
                return [(version, state)] if state else []
            return sorted(self._states.items())


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when a version directory is replaced or written to: inode and modification time."""
    try:
        directory = path.stat()
        return (directory.st_ino, directory.st_mtime_ns, *_file_identity(str(path / "saved_model.pb")))
    except OSError:
        return ()


def warm_up(model: LoadedModel) -> int:
    """Replays the version's tf_serving_warmup_requests (Predict records) before it takes traffic."""
    path = model.path / "assets.extra" / "tf_serving_warmup_requests"
    if not path.is_file():
        return 0
    count = 0
    for raw in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS):
        record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        if record.WhichOneof("log_type") != "predict_log":
            log.warning("%s: skipping a %s warmup record (only Predict is supported)", path, record.WhichOneof("log_type"))
            continue
        request = record.predict_log.request
        inputs = {k: from_tensor_proto(k, v) for k, v in request.inputs.items()}
        model.run(request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs)
        count += 1
    return count


def _file_identity(path: str) -> tuple[int, int, int]:
    """Changes when the file is rewritten, even within one coarse mtime tick (inode + size + mtime)."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ModelManager:
    """All served models; a background thread polls the disk (and the config file) for changes."""

    def __init__(
        self,
        sources: list[ModelSource],
        *,
        config_file: str | None = None,
        poll_wait_s: float = 1.0,
        config_poll_wait_s: float = 1.0,
        metrics: Metrics | None = None,
        read_config: Callable[[str], list[ModelSource]] = read_model_config,
    ) -> None:
        self._metrics = metrics
        self.models = {s.name: ServedModel(s, metrics) for s in sources}
        self._config_file = config_file
        self._read_config = read_config
        self._config_mtime = _file_identity(config_file) if config_file else None
        self._poll_wait_s = poll_wait_s
        self._config_poll_wait_s = config_poll_wait_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.crash: str | None = None
        self.on_change: Callable[[], None] | None = None

    def reconcile_all(self) -> None:
        for model in list(self.models.values()):
            try:
                model.reconcile()
            except Exception:
                log.exception("model %s: polling failed", model.name)

    def start_polling(self) -> None:
        if self._poll_wait_s <= 0 and not (self._config_file and self._config_poll_wait_s > 0):
            return
        self._thread = threading.Thread(target=self._poll_supervised, name="model-poller", daemon=True)
        self._thread.start()

    def poller_failure(self) -> str | None:
        """Why the poller is no longer running although it should be, or None."""
        if self._thread is None or self._stop.is_set() or self._thread.is_alive():
            return None
        return self.crash or "the model poller stopped"

    def _poll_supervised(self) -> None:
        try:
            self._poll()
        except BaseException as exc:  # recorded for the supervisor, which fails health and exits
            self.crash = f"the model poller died: {type(exc).__name__}: {exc}"
            log.exception("model poller died")

    def _poll(self) -> None:
        waits = [w for w in (self._poll_wait_s, self._config_poll_wait_s if self._config_file else 0) if w > 0]
        wait = min(waits)
        last_disk = last_config = time.monotonic()
        while not self._stop.wait(wait):
            now = time.monotonic()
            if self._config_file and self._config_poll_wait_s > 0 and now - last_config >= self._config_poll_wait_s:
                last_config = now
                self._reload_config()
            if self._poll_wait_s > 0 and now - last_disk >= self._poll_wait_s:
                last_disk = now
                before = {n: m.available_versions() for n, m in self.models.items()}
                self.reconcile_all()
                after = {n: m.available_versions() for n, m in self.models.items()}
                if before != after and self.on_change:
                    self.on_change()

    def _reload_config(self) -> None:
        if self._config_file is None:
            return
        try:
            mtime = _file_identity(self._config_file)
        except OSError as exc:
            log.error("model config %s unreadable: %s", self._config_file, exc)
            return
        if mtime == self._config_mtime:
            return
        try:
            sources = self._read_config(self._config_file)
        except ConfigError as exc:
            # Keep serving the last good config, as TF Serving does on a bad reload.
            log.error("model config %s not applied: %s", self._config_file, exc)
            return
        self._config_mtime = mtime
        names = {s.name for s in sources}
        # Copy, change, then swap in one assignment: request threads and health checks iterate
        # self.models while this runs, and a dict changed under an iteration raises.
        models = dict(self.models)
        for source in sources:
            if source.name in models:
                model = models[source.name]
                model.update_source(source)
            else:
                model = models[source.name] = ServedModel(source, self._metrics)
                self.models = {**self.models, source.name: model}  # requests reach it as it loads
            # Load what the new config wants before labels can point at it.
            model.reconcile()
        for name in set(models) - names:
            log.info("model %s removed from the config", name)
            del models[name]
        self.models = models
        log.info("model config %s applied", self._config_file)

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        return model

    def all_available(self) -> bool:
        return bool(self.models) and all(m.available_versions() for m in self.models.values())

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)


# ---------------------------------------------------------------------------------------------
# gRPC services


class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """PredictionService and ModelService over a ModelManager."""

    def __init__(self, manager: ModelManager, *, batcher: BatchScheduler | None, metrics: Metrics | None) -> None:
        self.manager = manager
        self.batcher = batcher
        self.metrics = metrics

    def _answer(self, method: str, context: grpc.ServicerContext, fn: Callable[[], Any], model: str = "") -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return fn()
        except RequestError as exc:
            code = exc.code
            context.abort(exc.code, _status_message(exc.message))
        except BatchingError as exc:
            code = grpc.StatusCode[exc.code]
            context.abort(code, _status_message(str(exc)))
        except tf.errors.OpError as exc:
            code = _CODES_BY_NUMBER.get(exc.error_code, grpc.StatusCode.INTERNAL)
            context.abort(code, _status_message(exc.message))
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            context.abort(code, _status_message(f"{type(exc).__name__}: {exc}"))
        finally:
            if self.metrics:
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.latency.labels(method).observe(time.perf_counter() - started)
                # The name is the client's: one it made up would be a new series for ever (the page and
                # the registry grow with every name a hostile client sends), so those count as "".
                self.metrics.tf_serving_requests.inc(model if model in self.manager.models else "", code.name)

    # -- Predict ----------------------------------------------------------------------------

    def Predict(self, request, context):  # noqa: N802 (gRPC's method name)
        return self._answer("Predict", context, lambda: self._predict(request), request.model_spec.name)

    def _predict(self, request):
        served = self.manager.get(request.model_spec.name)
        model = served.resolve(request.model_spec)
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature not in model.signature_defs or signature not in model.signature_names:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{signature}" not found.')
        inputs = {k: from_tensor_proto(k, v) for k, v in request.inputs.items()}
        try:
            model.check_inputs(signature, inputs)
        except SignatureError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        output_filter = list(request.output_filter)
        known = set(model.signature_defs[signature].outputs)
        unknown = [k for k in output_filter if k not in known]
        if unknown:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found in signature: {unknown[0]}")
        if self.batcher is not None:
            outputs = self.batcher.submit((model, signature), inputs)
        else:
            outputs = model.run(signature, inputs)
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        if self.metrics:
            self.metrics.rows.labels(served.name).inc(rows)
        response = self._response_type()()
        response.model_spec.name = served.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature
        for key, value in outputs.items():
            if output_filter and key not in output_filter:
                continue
            response.outputs[key].CopyFrom(to_tensor_proto(np.asarray(value)))
        return response

    @staticmethod
    def _response_type():
        from tensorflow_serving.apis import predict_pb2

        return predict_pb2.PredictResponse

    # -- metadata and status ----------------------------------------------------------------

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._answer("GetModelMetadata", context, lambda: self._metadata(request), request.model_spec.name)

    def _metadata(self, request):
        fields = list(request.metadata_field)
        if not fields:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF_FIELD:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        served = self.manager.get(request.model_spec.name)
        model = served.resolve(request.model_spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in model.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        packed = any_pb2.Any()
        packed.Pack(signature_map)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = served.name
        response.model_spec.version.value = model.version
        response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(packed)
        return response

    def GetModelStatus(self, request, context):  # noqa: N802
        return self._answer("GetModelStatus", context, lambda: self._status(request), request.model_spec.name)

    def _status(self, request):
        served = self.manager.get(request.model_spec.name)
        version = request.model_spec.version.value if request.model_spec.HasField("version") else None
        if request.model_spec.WhichOneof("version_choice") == "version_label":
            version = served.resolve(request.model_spec).version
        statuses = served.statuses(version)
        if not statuses:
            what = f"version {version} of model {served.name}" if version is not None else f"any version of model {served.name}"
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find {what}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, state in statuses:
            entry = response.model_version_status.add(version=v, state=state.state)
            entry.status.error_code = state.error_code
            entry.status.error_message = state.error_message
        return response

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "esp serve reloads its --model-config-file by polling instead")


def health_handler(is_serving: Callable[[], bool]) -> grpc.GenericRpcHandler:
    """gRPC's standard health service (grpc.health.v1.Health/Check) without grpcio-health-checking."""

    def check(request: esp_tfs_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> esp_tfs_pb2.HealthCheckResponse:
        if request.service not in HEALTH_SERVICE_NAMES:
            context.abort(grpc.StatusCode.NOT_FOUND, _status_message(f"unknown service {request.service!r}"))
        status = esp_tfs_pb2.HealthCheckResponse.SERVING if is_serving() else esp_tfs_pb2.HealthCheckResponse.NOT_SERVING
        return esp_tfs_pb2.HealthCheckResponse(status=status)

    return grpc.method_handlers_generic_handler(
        HEALTH_SERVICE,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=esp_tfs_pb2.HealthCheckRequest.FromString,
                response_serializer=esp_tfs_pb2.HealthCheckResponse.SerializeToString,
            )
        },
    )


# ---------------------------------------------------------------------------------------------
# The server


class RequireMetadata(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, any call that lacks the required metadata.

    In production an auth proxy or a service mesh in front of TF Serving checks the caller; this
    lets the client's per-call metadata be exercised against `esp serve` for real. The health check
    stays open, as a load balancer's probe would need it.
    """

    def __init__(self, required: tuple[tuple[str, str], ...]) -> None:
        self._required = dict(required)

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong call metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ())
        if all(sent.get(key) == value for key, value in self._required.items()):
            return continuation(handler_call_details)
        return self._deny


@dataclasses.dataclass
class ServerConfig:
    sources: list[ModelSource]
    config_file: str | None = None
    host: str = "127.0.0.1"
    port: int = 8500
    metrics_port: int = 0
    poll_wait_s: float = 1.0
    config_poll_wait_s: float = 1.0
    threads: int = 16
    max_message_bytes: int = 256 * 1024 * 1024
    batching: BatchingOptions | None = None
    grace_s: float = 10.0
    # PEM bytes; both set means TLS. TF Serving itself has the same pair (--ssl_config_file).
    tls_cert_chain: bytes | None = None
    tls_private_key: bytes | None = None
    # With TLS: the CA that client certificates must chain to, and whether one is required.
    tls_client_ca: bytes | None = None
    tls_require_client_auth: bool = False
    required_metadata: tuple[tuple[str, str], ...] = ()
    # TF Serving's REST port (status, metadata) and, on it, the Prometheus path of its monitoring config.
    rest_port: int = 0
    monitoring_path: str | None = None
    # Extra gRPC server arguments (TF Serving's --grpc_channel_arguments); they override ESP's.
    channel_arguments: tuple[tuple[str, int | str], ...] = ()
    # Local directory standing in for gs:// (see serving.model_config.read_model_config).
    gcs_local_dir: str | None = None
    # How often serve_forever checks that the supervised threads still run, seconds.
    supervise_interval_s: float = 0.5


class ModelServer:
    """The running server: `start()` loads models and binds; `stop()` drains and shuts down."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.manager = ModelManager(
            config.sources,
            config_file=config.config_file,
            poll_wait_s=config.poll_wait_s,
            config_poll_wait_s=config.config_poll_wait_s,
            metrics=self.metrics,
            read_config=lambda path: read_model_config(path, gcs_local_dir=config.gcs_local_dir),
        )
        self.batcher: BatchScheduler | None = None
        self._stopping = False
        self._server: grpc.Server | None = None
        self._endpoints: list[rest.HttpEndpoint] = []
        self._failure: str | None = None
        self._running = False
        self.servicer: Servicer | None = None
        self.port = 0
        self.metrics_port = 0
        self.rest_port = 0

    @staticmethod
    def _run_batch(key: Any, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        # The key holds the model itself, so a version unloaded meanwhile still finishes its batch.
        model, signature = key
        return model.run(signature, inputs)

    def start(self) -> None:
        """Binds every port, loads the models, then starts serving.

        Ports are bound first, so one in use fails start-up at once rather than after the models
        have loaded; nothing answers before the models are loaded (TF Serving opens its ports
        after its initial load too).
        """
        cfg = self.config
        if cfg.batching is not None:
            self.batcher = BatchScheduler(self._run_batch, cfg.batching, on_batch=self.metrics.batch_rows.observe)
        interceptors = [RequireMetadata(cfg.required_metadata)] if cfg.required_metadata else []
        options: dict[str, int | str] = {
            "grpc.max_send_message_length": cfg.max_message_bytes,
            "grpc.max_receive_message_length": cfg.max_message_bytes,
            # Without this a second server could bind the same port and take half the traffic.
            "grpc.so_reuseport": 0,
            # Accept clients' keepalive pings while calls are open.
            "grpc.http2.min_recv_ping_interval_without_data_ms": 10_000,
        }
        options.update(dict(cfg.channel_arguments))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=list(options.items()),
        )
        servicer = self.servicer = Servicer(self.manager, batcher=self.batcher, metrics=self.metrics)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, self._server)
        self._server.add_generic_rpc_handlers((health_handler(self.is_serving),))
        try:
            address = f"{cfg.host}:{cfg.port}"
            if cfg.tls_cert_chain is not None and cfg.tls_private_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(cfg.tls_private_key, cfg.tls_cert_chain)],
                    root_certificates=cfg.tls_client_ca,
                    require_client_auth=cfg.tls_require_client_auth,
                )
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} for gRPC: {exc}") from None
        if not self.port:
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} for gRPC (in use?)")
        if cfg.rest_port:
            routes = [rest.model_route(self._rest_status, self._rest_metadata, self.failure, RequestError)]
            if cfg.monitoring_path:
                routes.insert(0, rest.metrics_route(cfg.monitoring_path, self.metrics.page))
            endpoint = rest.HttpEndpoint("REST API", cfg.host, cfg.rest_port, routes)
            self._endpoints.append(endpoint)
            self.rest_port = endpoint.port
        if cfg.metrics_port:
            endpoint = rest.HttpEndpoint("metrics", cfg.host, cfg.metrics_port, [rest.metrics_route("/metrics", self.metrics.page)])
            self._endpoints.append(endpoint)
            self.metrics_port = endpoint.port
        self.manager.reconcile_all()
        self.manager.start_polling()
        self._server.start()
        for endpoint in self._endpoints:
            endpoint.start()
        self._running = True
        log.info(
            "gRPC on %s:%d, REST on %s, metrics on %s",
            cfg.host, self.port, self.rest_port or "off", cfg.monitoring_path if cfg.rest_port and cfg.monitoring_path else self.metrics_port or "off",
        )

    def _rest_status(self, request: Any) -> Any:
        return self._started_servicer()._status(request)

    def _rest_metadata(self, request: Any) -> Any:
        return self._started_servicer()._metadata(request)

    def _started_servicer(self) -> Servicer:
        if self.servicer is None:
            raise RuntimeError("the model server was not started")
        return self.servicer

    def failure(self) -> str | None:
        """Why the server can no longer do its job (a supervised part died), or None.

        Once set it stays set: a server that lost a thread is restarted, not trusted again.
        """
        if self._failure is None and self._running and not self._stopping:
            if self._server is not None and not self._server.wait_for_termination(timeout=0):
                self._failure = "the gRPC server terminated"
            elif (crash := self.manager.poller_failure()) is not None:
                self._failure = crash
            else:
                for endpoint in self._endpoints:
                    if not endpoint.thread.is_alive():
                        self._failure = f"the {endpoint.name} endpoint stopped"
                        break
            if self._failure is not None:
                log.error("failing: %s", self._failure)
        return self._failure

    def is_serving(self) -> bool:
        return not self._stopping and self.failure() is None and self.manager.all_available()

    def wait_available(self, stop: threading.Event, poll_s: float = 0.05) -> bool:
        """Blocks until every model has a version taking traffic (True), or `stop` is set or the server fails (False)."""
        while not stop.is_set() and self.failure() is None:
            if self.manager.all_available():
                return True
            stop.wait(poll_s)
        return False

    def stop(self) -> None:
        """Stops taking requests, lets in-flight ones finish (up to grace_s), then shuts down."""
        self._stopping = True
        started = time.monotonic()
        if self._server is not None:
            self._server.stop(self.config.grace_s).wait()
        for endpoint in self._endpoints:
            endpoint.stop()
        if self.batcher is not None:
            self.batcher.close()
        self.manager.stop()
        log.info("stopped in %.2f s", time.monotonic() - started)


def serve_forever(
    server: ModelServer, on_ready: Callable[[ModelServer], None], on_change: Callable[[ModelServer], None]
) -> str | None:
    """Runs until SIGTERM or SIGINT (returns None) or until a supervised part dies (returns why).

    Either way it drains and stops; the caller exits non-zero when a reason comes back.
    """
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        server.manager.on_change = lambda: on_change(server)
        if server.wait_available(stop):
            on_ready(server)
        while not stop.wait(server.config.supervise_interval_s):
            if server.failure() is not None:
                break
        return server.failure()
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
