"""`ApiProcess`: `esp api` as a child process, for the tests, the demo and the benchmark.

Settings travel as the environment variables the CLI reads, as in a Kubernetes pod. Ready means
/readyz answers 200 (the model answered); `wait_for_ready=False` waits only for /healthz.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esp.localstack import ManagedProcess, free_port
from worker.local import settings_env


class ApiProcess(ManagedProcess):
    def __init__(
        self,
        *groups: Any,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 60.0,
        wait_for_ready: bool = True,
        wrapper: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        values = settings_env(*groups)
        port = int(values.get("ESP_API_PORT", "0") or 0) or free_port()
        values["ESP_API_PORT"] = str(port)
        values.setdefault("ESP_API_HOST", "127.0.0.1")
        self.port = port
        self.wrapper = list(wrapper)
        full_env = dict(os.environ)
        full_env.update(values)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        super().__init__(
            "esp-api",
            [sys.executable, "-m", "esp.cli.main", "api"],
            ready=self.is_ready if wait_for_ready else self.answers,
            env=full_env,
            log_path=log_path,
            start_timeout_s=start_timeout_s,
            cwd=cwd,
        )

    def command(self) -> list[str]:
        return [*self.wrapper, *self.argv]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, *, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request: (status, headers with lower-case names, body). Raises OSError when nothing answers."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=dict(headers or {}))
        if data is not None and "Content-Type" not in (headers or {}):
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def post_json(self, path: str, body: dict | bytes, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, raw = self.request("POST", path, body, **kwargs)
        return status, headers, json.loads(raw) if raw else None

    def is_ready(self) -> bool:
        try:
            return self.request("GET", "/readyz", timeout_s=2)[0] == 200
        except OSError:
            return False

    def answers(self) -> bool:
        try:
            self.request("GET", "/healthz", timeout_s=2)
            return True
        except OSError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample on /metrics (0.0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics")[2].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0
