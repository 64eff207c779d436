"""Model serving settings: how clients reach the model server, and how `esp serve` runs one.

`ModelClientSettings` is shared by everything that scores through TF Serving's gRPC API (the
worker, the Beam backfill, `esp score`); `ModelServerSettings` configures the local
TF-Serving-compatible server `esp serve`. Field names carry their unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting

INT32_MAX = 2**31 - 1  # gRPC's integer options are C ints
MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelClientSettings:
    model_server: str = setting(
        "127.0.0.1:8500", env="ESP_MODEL_SERVER", help="host:port of the TF Serving (or `esp serve`) gRPC endpoint."
    )
    model_name: str = setting("bert", env="ESP_MODEL_NAME", help="Model name on the model server.")
    model_version: int | None = setting(
        None, env="ESP_MODEL_VERSION", help="Pin one model version; unset means the server's choice (latest)."
    )
    model_version_label: str | None = setting(
        None,
        env="ESP_MODEL_VERSION_LABEL",
        help="Version label to score with (e.g. `stable`, `canary`); excludes --model-version.",
    )
    model_signature: str = setting(
        "serving_default", env="ESP_MODEL_SIGNATURE", help="Signature name of the SavedModel to call."
    )
    model_timeout_s: float = setting(
        10.0, env="ESP_MODEL_TIMEOUT_S", help="Deadline of one gRPC call to the model server, seconds."
    )
    model_retry_budget_s: float = setting(
        30.0,
        env="ESP_MODEL_RETRY_BUDGET_S",
        help="Total time one predict may spend retrying UNAVAILABLE/DEADLINE_EXCEEDED/RESOURCE_EXHAUSTED, seconds.",
    )
    model_retry_initial_backoff_s: float = setting(
        0.05, env="ESP_MODEL_RETRY_INITIAL_BACKOFF_S", help="First retry backoff (doubles, full jitter), seconds."
    )
    model_retry_max_backoff_s: float = setting(
        2.0, env="ESP_MODEL_RETRY_MAX_BACKOFF_S", help="Cap of the retry backoff, seconds."
    )
    model_max_message_bytes: int = setting(
        256 * MIB,
        env="ESP_MODEL_MAX_MESSAGE_BYTES",
        help="Largest gRPC message the client sends or accepts, bytes (gRPC's 4 MiB default breaks big batches).",
    )
    model_tls_root_certs: str | None = setting(
        None,
        env="ESP_MODEL_TLS_ROOT_CERTS",
        help="PEM file of root certificates: connect with TLS; unset means plaintext.",
    )
    model_call_metadata: str | None = setting(
        None,
        env="ESP_MODEL_CALL_METADATA",
        help="Metadata sent with every call, `key=value,key=value` (e.g. `authorization=Bearer TOKEN`).",
    )
    model_keepalive_s: float = setting(
        60.0, env="ESP_MODEL_KEEPALIVE_S", help="gRPC keepalive ping interval while calls are open, seconds."
    )
    model_load_balancing: str = setting(
        "round_robin",
        env="ESP_MODEL_LOAD_BALANCING",
        help="How calls spread over the addresses --model-server resolves to: `round_robin` (every replica "
        "behind a headless Service, `dns:///NAME:PORT`) or `pick_first` (one connection).",
        choices=("round_robin", "pick_first"),
    )
    model_tls_server_name: str | None = setting(
        None,
        env="ESP_MODEL_TLS_SERVER_NAME",
        help="Name the model server's TLS certificate must carry, when it is not the host in --model-server.",
    )

    def __post_init__(self) -> None:
        require(":" in self.model_server, f"model_server {self.model_server!r} must be host:port")
        require(self.model_name != "", "model_name must not be empty")
        require(
            self.model_version is None or self.model_version_label is None,
            "set model_version or model_version_label, not both",
        )
        require(self.model_version is None or self.model_version > 0, "model_version must be a positive integer")
        require(self.model_timeout_s > 0, "model_timeout_s must be positive")
        require(self.model_retry_budget_s >= 0, "model_retry_budget_s must not be negative")
        require(
            0 < self.model_retry_initial_backoff_s <= self.model_retry_max_backoff_s,
            "retry backoff must satisfy 0 < initial <= max",
        )
        require(4 * MIB <= self.model_max_message_bytes <= INT32_MAX, "model_max_message_bytes must be between 4 MiB and 2147483647 (gRPC's limit)")
        require(self.model_keepalive_s > 0, "model_keepalive_s must be positive")
        require(
            self.model_tls_server_name is None or self.model_tls_root_certs is not None,
            "model_tls_server_name needs model_tls_root_certs (it names the certificate of a TLS server)",
        )
        self.call_metadata()  # validates the format up front

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The per-call metadata as gRPC wants it."""
        return parse_metadata(self.model_call_metadata, "model_call_metadata")


def parse_metadata(value: str | None, name: str, *, lower: bool = True) -> tuple[tuple[str, str], ...]:
    """`key=value[,key=value]` as pairs; gRPC metadata keys are lowercase (`lower`)."""
    if not value:
        return ()
    pairs = []
    for item in value.split(","):
        key, sep, val = item.partition("=")
        require(bool(sep) and key.strip() != "", f"{name} item {item!r} is not key=value")
        pairs.append((key.strip().lower() if lower else key.strip(), val.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class ModelServerSettings:
    model_base_path: str | None = setting(
        None,
        env="ESP_MODEL_BASE_PATH",
        help="Directory of integer version subdirectories (TF Serving layout); the latest version is served.",
    )
    model_config_file: str | None = setting(
        None,
        env="ESP_MODEL_CONFIG_FILE",
        help="TF Serving models.config (text format): models, version policies, version labels. Excludes --model-base-path.",
    )
    port: int = setting(8500, env="ESP_SERVE_PORT", help="gRPC port (0 picks a free one and prints it).")
    rest_api_port: int = setting(
        0,
        env="ESP_SERVE_REST_API_PORT",
        help="Port of TF Serving's REST model status and metadata (GET /v1/models/NAME[/versions/N|/labels/L][/metadata]) "
        "and of the Prometheus page of --monitoring-config-file; 0 disables it.",
    )
    monitoring_config_file: str | None = setting(
        None,
        env="ESP_SERVE_MONITORING_CONFIG_FILE",
        help="TF Serving MonitoringConfig (text format): with prometheus_config enabled, metrics on the REST port at its path.",
    )
    grpc_channel_arguments: str | None = setting(
        None,
        env="ESP_SERVE_GRPC_CHANNEL_ARGUMENTS",
        help="gRPC server arguments, `key=value,key=value`, as TF Serving's --grpc_channel_arguments "
        "(e.g. grpc.max_connection_age_ms=30000, so clients reconnect and find new replicas).",
    )
    ssl_config_file: str | None = setting(
        None,
        env="ESP_SERVE_SSL_CONFIG_FILE",
        help="TF Serving SSLConfig (text format: server_key, server_cert, custom_ca, client_verify): serve gRPC over TLS. "
        "Excludes --tls-cert-file.",
    )
    gcs_local_dir: str | None = setting(
        None,
        env="ESP_SERVE_GCS_LOCAL_DIR",
        help="Read gs://BUCKET/PATH base paths from DIR/BUCKET/PATH: a local stand-in for Cloud Storage, to run a "
        "production models.config unchanged.",
    )
    bind_host: str = setting("127.0.0.1", env="ESP_SERVE_BIND_HOST", help="Address to listen on (0.0.0.0 in a container).")
    metrics_port: int = setting(
        0, env="ESP_SERVE_METRICS_PORT", help="Port of the Prometheus /metrics endpoint; 0 disables it."
    )
    file_system_poll_wait_s: float = setting(
        1.0, env="ESP_SERVE_POLL_WAIT_S", help="How often to look for new model versions, seconds; 0 disables polling."
    )
    model_config_file_poll_wait_s: float = setting(
        1.0,
        env="ESP_SERVE_CONFIG_POLL_WAIT_S",
        help="How often to re-read --model-config-file (labels, versions), seconds; 0 reads it once.",
    )
    server_threads: int = setting(16, env="ESP_SERVE_THREADS", help="gRPC worker threads (concurrent requests).")
    max_message_bytes: int = setting(
        256 * MIB, env="ESP_SERVE_MAX_MESSAGE_BYTES", help="Largest gRPC message the server sends or accepts, bytes."
    )
    tls_cert_file: str | None = setting(
        None,
        env="ESP_SERVE_TLS_CERT_FILE",
        help="PEM certificate chain: serve gRPC over TLS (with --tls-key-file); unset means plaintext.",
    )
    tls_key_file: str | None = setting(
        None, env="ESP_SERVE_TLS_KEY_FILE", help="PEM private key of --tls-cert-file."
    )
    required_call_metadata: str | None = setting(
        None,
        env="ESP_SERVE_REQUIRED_CALL_METADATA",
        help="key=value[,key=value]: every call but the health check must carry this metadata, else "
        "UNAUTHENTICATED (stands in for the auth proxy in front of TF Serving).",
    )
    enable_batching: bool = setting(
        False, env="ESP_SERVE_ENABLE_BATCHING", help="Merge concurrent requests into batches on the server."
    )
    batching_parameters_file: str | None = setting(
        None,
        env="ESP_SERVE_BATCHING_PARAMETERS_FILE",
        help="TF Serving batching_parameters.txt; its values override the --max-batch-size etc. options.",
    )
    max_batch_size: int = setting(
        1024,
        env="ESP_SERVE_MAX_BATCH_SIZE",
        help="Server-side batching: largest request accepted, rows (and largest batch run without splitting).",
    )
    max_execution_batch_size: int = setting(
        32,
        env="ESP_SERVE_MAX_EXECUTION_BATCH_SIZE",
        help="Server-side batching with splitting: largest batch the model runs, rows.",
    )
    batch_timeout_micros: int = setting(
        2000, env="ESP_SERVE_BATCH_TIMEOUT_MICROS", help="Server-side batching: longest wait to fill a batch, microseconds."
    )
    num_batch_threads: int = setting(
        0, env="ESP_SERVE_NUM_BATCH_THREADS", help="Server-side batching: batches run in parallel; 0 means one per CPU."
    )
    max_enqueued_batches: int = setting(
        100, env="ESP_SERVE_MAX_ENQUEUED_BATCHES", help="Server-side batching: queue bound, batches; beyond it UNAVAILABLE."
    )
    enable_large_batch_splitting: bool = setting(
        True,
        env="ESP_SERVE_ENABLE_LARGE_BATCH_SPLITTING",
        help="Server-side batching: split requests so no batch run exceeds --max-execution-batch-size (else batches hold up to --max-batch-size rows).",
    )

    def __post_init__(self) -> None:
        require(
            (self.model_base_path is None) != (self.model_config_file is None),
            "give exactly one of model_base_path and model_config_file",
        )
        require(self.model_base_path != "", "model_base_path must not be empty (it would mean the current directory)")
        require(0 <= self.port <= 65535, "port must be 0..65535")
        require(0 <= self.metrics_port <= 65535, "metrics_port must be 0..65535")
        require(0 <= self.rest_api_port <= 65535, "rest_api_port must be 0..65535")
        require(
            self.rest_api_port == 0 or self.rest_api_port != self.port,
            "rest_api_port must differ from port",
        )
        require(
            self.ssl_config_file is None or self.tls_cert_file is None,
            "give ssl_config_file or tls_cert_file/tls_key_file, not both",
        )
        self.channel_arguments()  # validates the format up front
        require(self.file_system_poll_wait_s >= 0, "file_system_poll_wait_s must not be negative")
        require(self.model_config_file_poll_wait_s >= 0, "model_config_file_poll_wait_s must not be negative")
        require(self.server_threads >= 1, "server_threads must be at least 1")
        require(4 * MIB <= self.max_message_bytes <= INT32_MAX, "max_message_bytes must be between 4 MiB and 2147483647 (gRPC's limit)")
        require(self.max_batch_size >= 1, "max_batch_size must be at least 1")
        require(self.max_execution_batch_size >= 1, "max_execution_batch_size must be at least 1")
        require(self.batch_timeout_micros >= 0, "batch_timeout_micros must not be negative")
        require(self.num_batch_threads >= 0, "num_batch_threads must not be negative")
        require(self.max_enqueued_batches >= 1, "max_enqueued_batches must be at least 1")
        require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "give both tls_cert_file and tls_key_file, or neither",
        )
        self.required_metadata()  # validates the format up front

    def required_metadata(self) -> tuple[tuple[str, str], ...]:
        return parse_metadata(self.required_call_metadata, "required_call_metadata")

    def channel_arguments(self) -> tuple[tuple[str, int | str], ...]:
        """--grpc-channel-arguments as gRPC options; integers become ints, as TF Serving parses them."""
        pairs = []
        for key, value in parse_metadata(self.grpc_channel_arguments, "grpc_channel_arguments", lower=False):
            require(key.startswith("grpc."), f"grpc_channel_arguments: {key!r} is not a gRPC argument (grpc.*)")
            try:
                number = int(value)
            except ValueError:
                pairs.append((key, value))
                continue
            # gRPC takes integer arguments as C ints.
            require(-INT32_MAX - 1 <= number <= INT32_MAX, f"grpc_channel_arguments: {key}={value} is beyond a 32-bit integer")
            pairs.append((key, number))
        return tuple(pairs)
