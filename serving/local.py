"""`esp serve` as a child process, for the tests, the demo and the benchmarks.

A `ManagedProcess` (esp.localstack) like the emulator and the worker: it runs the same command as
`esp serve` on a base path or a models.config, is ready when the gRPC health check says SERVING,
and is stopped by its own pid. The port is chosen before the start and kept across restarts, so
clients pointed at `.target` find the new process.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from esp.localstack import ManagedProcess, free_port
from serving.client import health_check


class ModelServerProcess(ManagedProcess):
    """One `esp serve` child process; give `base_path` (served as `model_name`) or `model_config_file`."""

    def __init__(
        self,
        base_path: str | os.PathLike | None = None,
        *,
        model_config_file: str | os.PathLike | None = None,
        model_name: str = "bert",
        port: int = 0,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        poll_wait_s: float = 0.2,
        start_timeout_s: float = 120.0,
        tls_root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        rest_api_port: int | None = None,
    ) -> None:
        if (base_path is None) == (model_config_file is None):
            raise ValueError("give exactly one of base_path and model_config_file")
        self.base_path = Path(base_path) if base_path is not None else None
        self.model_config_file = Path(model_config_file) if model_config_file is not None else None
        self.model_name = model_name
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.python = python
        self.poll_wait_s = poll_wait_s
        self.rest_api_port = rest_api_port
        full_env = dict(os.environ if env is None else env)
        # TensorFlow's C++ start-up notes are noise in a log read for errors.
        full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        super().__init__(
            "esp-serve",
            [],
            # A server started with --tls-cert-file answers only over TLS: give its CA here. With a
            # REST port, readiness is TF Serving's model status there (as Kubernetes probes it).
            ready=(
                self._rest_ready
                if rest_api_port
                else lambda: health_check(
                    self.target, timeout_s=1.0, root_certificates=tls_root_certificates, tls_server_name=tls_server_name
                )
            ),
            env=full_env,
            log_path=Path(log_path) if log_path is not None else None,
            start_timeout_s=start_timeout_s,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _rest_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_api_port}/v1/models/{self.model_name}", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "esp.cli.serve_cmd", "--port", str(self.port), "--bind-host", "127.0.0.1"]
        if self.base_path is not None:
            cmd += ["--model-base-path", str(self.base_path), "--model-name", self.model_name]
        else:
            cmd += ["--model-config-file", str(self.model_config_file)]
        cmd += ["--file-system-poll-wait-s", str(self.poll_wait_s), "--model-config-file-poll-wait-s", str(self.poll_wait_s)]
        if self.rest_api_port:
            cmd += ["--rest-api-port", str(self.rest_api_port)]
        return cmd + self.extra_args

    def start(self, timeout_s: float | None = None) -> ModelServerProcess:
        if timeout_s is not None:
            self.start_timeout_s = timeout_s
        super().start()
        return self

    def stop(self, grace_s: float = 15.0, sig: int | None = None) -> int | None:  # type: ignore[override]
        """SIGTERM (drain, then exit), SIGKILL after `grace_s`. Returns the exit code."""
        return super().stop(timeout_s=grace_s) if sig is None else super().stop(timeout_s=grace_s, sig=sig)

    def restart(self, timeout_s: float | None = None) -> ModelServerProcess:  # type: ignore[override]
        self.stop()
        return self.start(timeout_s)
