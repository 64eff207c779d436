"""Logging settings, shared by every long-running process."""

from __future__ import annotations

from dataclasses import dataclass

from esp.settings.base import setting


@dataclass(frozen=True)
class LogSettings:
    log_level: str = setting(
        "INFO", env="ESP_LOG_LEVEL", help="Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    log_format: str = setting(
        "text", env="ESP_LOG_FORMAT", help="`json` for one JSON object per line (Kubernetes), `text` for people.",
        choices=("text", "json"),
    )
