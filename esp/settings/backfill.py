"""Settings of the Beam backfill: how it reaches BigQuery, and how it reads and scores.

`BigQuerySettings` says where BigQuery is (the real service, or an emulator through its two
endpoints) and how long its jobs may take; `BackfillSettings` holds the backfill's own knobs (the
source's column names, TensorFlow threads per worker, progress interval). What to read and where to
write (files, tables, the topic) are options of `esp backfill` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import require, setting


@dataclass(frozen=True)
class BigQuerySettings:
    bigquery_project: str | None = setting(
        None,
        env="ESP_BIGQUERY_PROJECT",
        help="Project that runs (and pays for) the backfill's BigQuery jobs and read sessions; unset means the "
        "project of the scores table, else of the source table.",
    )
    bigquery_location: str | None = setting(
        None, env="ESP_BIGQUERY_LOCATION", help="BigQuery location of the datasets (e.g. `EU`); unset lets BigQuery infer it."
    )
    bigquery_api_endpoint: str | None = setting(
        None,
        env="ESP_BIGQUERY_API_ENDPOINT",
        help="BigQuery REST endpoint; unset means Google's. An `http://` endpoint is taken for an emulator: no "
        "credentials, plaintext gRPC to --bigquery-storage-endpoint.",
    )
    bigquery_storage_endpoint: str | None = setting(
        None,
        env="ESP_BIGQUERY_STORAGE_ENDPOINT",
        help="host:port of the BigQuery Storage Read/Write gRPC API; unset means Google's.",
    )
    bigquery_timeout_s: float = setting(
        1800.0,
        env="ESP_BIGQUERY_TIMEOUT_S",
        help="Longest wait for one BigQuery job (the source query, the MERGE), seconds.",
    )
    bigquery_staging_expiration_h: int = setting(
        24,
        env="ESP_BIGQUERY_STAGING_EXPIRATION_H",
        help="Staging and query-result tables expire after this many hours, so a crashed run leaves nothing behind for long.",
    )
    bigquery_max_read_streams: int = setting(
        0,
        env="ESP_BIGQUERY_MAX_READ_STREAMS",
        help="Most Storage Read streams per source (the parallelism of reading); 0 lets BigQuery choose.",
    )

    def __post_init__(self) -> None:
        require(
            (self.bigquery_api_endpoint is None) == (self.bigquery_storage_endpoint is None),
            "set both bigquery_api_endpoint and bigquery_storage_endpoint (an emulator serves both), or neither",
        )
        if self.bigquery_api_endpoint is not None:
            require(
                self.bigquery_api_endpoint.startswith(("http://", "https://")),
                f"bigquery_api_endpoint {self.bigquery_api_endpoint!r} must start with http:// or https://",
            )
        if self.bigquery_storage_endpoint is not None:
            host, sep, port = self.bigquery_storage_endpoint.rpartition(":")
            require(bool(sep and host and port.isdigit()), f"bigquery_storage_endpoint {self.bigquery_storage_endpoint!r} must be host:port")
        require(self.bigquery_timeout_s > 0, "bigquery_timeout_s must be positive")
        require(1 <= self.bigquery_staging_expiration_h <= 24 * 30, "bigquery_staging_expiration_h must be 1..720")
        require(0 <= self.bigquery_max_read_streams <= 10_000, "bigquery_max_read_streams must be 0..10000")

    @property
    def emulated(self) -> bool:
        """True for a local emulator: anonymous credentials and plaintext gRPC."""
        return bool(self.bigquery_api_endpoint and self.bigquery_api_endpoint.startswith("http://"))


@dataclass(frozen=True)
class BackfillSettings:
    id_column: str = setting(
        "id", env="ESP_BACKFILL_ID_COLUMN", help="BigQuery source: column holding the comment id (STRING, or INT64 read as its decimal string)."
    )
    text_column: str = setting("text", env="ESP_BACKFILL_TEXT_COLUMN", help="BigQuery source: column holding the comment text.")
    tf_threads: int = setting(
        0,
        env="ESP_BACKFILL_TF_THREADS",
        help="TensorFlow intra- and inter-op threads per Beam worker process with --backend saved_model; 0 is "
        "TensorFlow's choice. Set 1 when several worker processes share the cores.",
    )
    progress_interval_s: float = setting(
        10.0,
        env="ESP_BACKFILL_PROGRESS_INTERVAL_S",
        help="How often each Beam worker process logs rows read, scored and dead-lettered, and rows/s, seconds.",
    )

    def __post_init__(self) -> None:
        for name in ("id_column", "text_column"):
            value = getattr(self, name)
            require(value.replace("_", "a").isalnum() and not value[:1].isdigit(), f"{name} {value!r} is not a BigQuery column name")
        require(self.id_column != self.text_column, "id_column and text_column must differ")
        require(0 <= self.tf_threads <= 256, "tf_threads must be 0..256")
        require(self.progress_interval_s > 0, "progress_interval_s must be positive")
