"""Log setup for ESP's long-running processes: readable text for people, one JSON object per line for Kubernetes.

Records may carry `model_version` and `batch_id` through `extra=`; both formats show them when
present, so a log line can be tied to the batch and model version that produced it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from esp.settings import LogSettings

# `extra` fields worth showing on every line that has them.
CONTEXT_FIELDS = ("model_version", "batch_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the fields log pipelines expect (time, severity, logger, message)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [f"{f}={getattr(record, f)}" for f in CONTEXT_FIELDS if getattr(record, f, None) is not None]
        return f"{line} [{' '.join(context)}]" if context else line


def configure_logging(settings: LogSettings, *, stream: Any = None) -> None:
    """Replaces the root logger's handlers with one stderr handler in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # Client libraries log every retry at INFO, and Beam one line per type hint it reads when a job
    # graph is built (about forty for the backfill); keep them at WARNING unless debugging.
    if settings.log_level != "DEBUG":
        for noisy in ("google", "grpc", "urllib3", "apache_beam.typehints"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
