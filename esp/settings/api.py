"""Settings of the HTTP scoring API (`esp api`): where it listens, its limits, keys, CORS and deadline.

Defaults suit one API pod in front of TF Serving: a 2-second request deadline (a person waiting for
a score gives up long before the model client's 30 s retry budget), Perspective's own 20 KB text
limit, and a queue bound that keeps a burst from turning into minutes of waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class ApiSettings:
    api_host: str = setting(
        "127.0.0.1", env="ESP_API_HOST", help="Address the HTTP API listens on (0.0.0.0 in a container)."
    )
    api_port: int = setting(8080, env="ESP_API_PORT", help="Port of the HTTP API; 0 picks a free one and prints it.")
    api_max_body_bytes: int = setting(
        1 * MIB,
        env="ESP_API_MAX_BODY_BYTES",
        help="Largest request body accepted, bytes; a larger one is answered 413 without being read.",
    )
    api_max_comments: int = setting(
        64, env="ESP_API_MAX_COMMENTS", help="Most comments in one POST /v1/score request; more is answered 413."
    )
    api_max_text_bytes: int = setting(
        20 * KIB,
        env="ESP_API_MAX_TEXT_BYTES",
        help="Longest comment text, UTF-8 bytes (Perspective's limit is 20 KB); longer is answered 413 "
        "(400 COMMENT_TOO_LONG on the Perspective endpoints).",
    )
    api_max_spans: int = setting(
        32,
        env="ESP_API_MAX_SPANS",
        help="Most sentences scored for one Perspective `spanAnnotations` request; a text with more is answered 400.",
    )
    api_request_deadline_s: float = setting(
        2.0,
        env="ESP_API_REQUEST_DEADLINE_S",
        help="Longest a request may wait for its scores, seconds; it also caps the model client's retry budget. "
        "Past it a request that waited on an unavailable model server is answered 503 with Retry-After.",
    )
    api_max_queued: int = setting(
        1000,
        env="ESP_API_MAX_QUEUED",
        help="Most comments waiting for a batch; beyond it requests are answered 429 with Retry-After.",
    )
    api_keys_file: str | None = setting(
        None,
        env="ESP_API_KEYS_FILE",
        help="File of API keys, stored hashed (`esp api new-key` writes a line; mount a Kubernetes Secret here). "
        "Unset: no key is needed. Re-read when it changes.",
    )
    api_default_rate_per_s: float = setting(
        10.0,
        env="ESP_API_DEFAULT_RATE_PER_S",
        help="Comments per second a key may score when its line sets no rate (token bucket refill).",
    )
    api_default_burst: int = setting(
        20, env="ESP_API_DEFAULT_BURST", help="Token bucket size of a key whose line sets none, comments."
    )
    api_cors_origins: str = setting(
        "",
        env="ESP_API_CORS_ORIGINS",
        help="Comma-separated origins browsers may call the API from (`https://app.example.com`); `*` for any; "
        "empty for none.",
    )
    api_languages: str = setting(
        "en",
        env="ESP_API_LANGUAGES",
        help="Comma-separated ISO 639-1 languages the model is trained for; other `languages` in a Perspective "
        "request are answered 400 LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE.",
    )
    api_read_timeout_s: float = setting(
        10.0,
        env="ESP_API_READ_TIMEOUT_S",
        help="Longest a client may take to send its request headers, and then its body, seconds; slow headers "
        "close the connection, a slow body is answered 408.",
    )
    api_access_log: bool = setting(
        True, env="ESP_API_ACCESS_LOG", help="Log one line per request (method, path with the key redacted, status, time)."
    )
    api_shutdown_grace_s: float = setting(
        10.0,
        env="ESP_API_SHUTDOWN_GRACE_S",
        help="On SIGTERM, how long requests in flight may take to finish, seconds (keep it below the pod's "
        "terminationGracePeriodSeconds).",
    )
    def __post_init__(self) -> None:
        require(0 <= self.api_port <= 65535, "api_port must be between 0 and 65535")
        require(1 * KIB <= self.api_max_body_bytes <= 64 * MIB, "api_max_body_bytes must be between 1 KiB and 64 MiB")
        require(1 <= self.api_max_comments <= 4096, "api_max_comments must be between 1 and 4096")
        require(1 <= self.api_max_text_bytes <= self.api_max_body_bytes, "api_max_text_bytes must be between 1 and api_max_body_bytes")
        require(1 <= self.api_max_spans <= 1024, "api_max_spans must be between 1 and 1024")
        require(0 < self.api_request_deadline_s <= 300, "api_request_deadline_s must be positive and at most 300")
        require(self.api_max_queued >= 1, "api_max_queued must be at least 1")
        require(self.api_default_rate_per_s > 0, "api_default_rate_per_s must be positive")
        require(self.api_default_burst >= 1, "api_default_burst must be at least 1")
        require(self.api_read_timeout_s > 0, "api_read_timeout_s must be positive")
        require(self.api_shutdown_grace_s >= 0, "api_shutdown_grace_s must not be negative")
        require(bool(self.languages()), "api_languages must name at least one language")

    def cors_origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.api_cors_origins.split(",") if o.strip())

    def languages(self) -> tuple[str, ...]:
        return tuple(lang.strip().lower() for lang in self.api_languages.split(",") if lang.strip())
