"""`WorkerProcess`: `esp worker run` as a child process, for the tests, the demo and the benchmark.

Settings travel as the environment variables the CLI reads (the same way a Kubernetes pod gets
them), so what runs here is exactly what runs in production. Ready means /readyz answers 200:
the model answered and the worker is pulling.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esp.localstack import ManagedProcess, free_port
from esp.settings import describe


def settings_env(*groups: Any) -> dict[str, str]:
    """The environment variables that reproduce these settings objects (None values left out)."""
    env: dict[str, str] = {}
    for group in groups:
        for info in describe(type(group)):
            value = getattr(group, info.name)
            if value is None:
                continue
            env[info.env] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return env


class WorkerProcess(ManagedProcess):
    """Runs `esp worker run` with the given settings groups (PubSubSettings, WorkerSettings, ...).

    `metrics_port` is chosen here (free port) unless a WorkerSettings group sets a non-zero one,
    so the readiness probe knows where to look. `start()` returns when /readyz answers 200, or,
    with `wait_for_ready=False`, as soon as the HTTP endpoints answer at all.
    """

    def __init__(
        self,
        *groups: Any,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 60.0,
        name: str = "esp-worker",
        wait_for_ready: bool = True,
    ) -> None:
        values = settings_env(*groups)
        port = int(values.get("ESP_METRICS_PORT", "0") or 0) or free_port()
        values["ESP_METRICS_PORT"] = str(port)
        values.setdefault("ESP_METRICS_HOST", "127.0.0.1")
        self.metrics_port = port
        full_env = dict(os.environ)
        full_env.update(values)
        full_env.update(env or {})
        # Unbuffered, so the log file shows what happened up to a kill.
        full_env["PYTHONUNBUFFERED"] = "1"
        super().__init__(
            name,
            [sys.executable, "-m", "esp.cli.main", "worker", "run"],
            ready=self.is_ready if wait_for_ready else self.answers,
            env=full_env,
            log_path=log_path,
            start_timeout_s=start_timeout_s,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=2) as resp:  # nosec B310: fixed http:// URL of our own worker
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def is_ready(self) -> bool:
        try:
            return self._get("/readyz")[0] == 200
        except OSError:
            return False

    def answers(self) -> bool:
        try:
            self._get("/healthz")
            return True
        except OSError:
            return False

    def readyz(self) -> tuple[int, str]:
        """(status, body) of /readyz; raises OSError when nothing answers."""
        return self._get("/readyz")

    def metrics_text(self) -> str:
        return self._get("/metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample on /metrics (0.0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0
