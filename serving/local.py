"""Start and stop `esp serve` as a child process: for tests, the demo and the benchmarks.

`ModelServerProcess` runs `python -m esp.cli.serve_cmd` (the same command as `esp serve`) on a
base path or a models.config, waits until it announces itself and answers the gRPC health check,
and stops it by pid (SIGTERM, then SIGKILL after a grace period). Its output goes to a log file,
whose tail is in every error, so a server that fails to start says why.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from serving.client import health_check

log = logging.getLogger(__name__)

_READY = re.compile(r"^serving model (\S+) version .* on (\S+):(\d+)", re.MULTILINE)


class ModelServerError(RuntimeError):
    """The model server did not start, or stopped unexpectedly."""


class ModelServerProcess:
    """One `esp serve` child process.

    Give `base_path` (served as `model_name`, latest version) or `model_config_file`. `port=0`
    lets the server pick a free port on first start; `restart()` reuses the port it got, so
    clients pointed at `.target` reconnect to the new process.
    """

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
    ) -> None:
        if (base_path is None) == (model_config_file is None):
            raise ValueError("give exactly one of base_path and model_config_file")
        self.base_path = Path(base_path) if base_path is not None else None
        self.model_config_file = Path(model_config_file) if model_config_file is not None else None
        self.model_name = model_name
        self.port = port
        self.extra_args = list(extra_args)
        self.python = python
        self.env = env
        self.poll_wait_s = poll_wait_s
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="esp-serve-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0

    @property
    def target(self) -> str:
        if not self.port:
            raise ModelServerError("the model server has not started yet")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ModelServerError("the model server has not started yet")
        return self._proc.pid

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "esp.cli.serve_cmd", "--port", str(self.port), "--bind-host", "127.0.0.1"]
        if self.base_path is not None:
            cmd += ["--model-base-path", str(self.base_path), "--model-name", self.model_name]
        else:
            cmd += ["--model-config-file", str(self.model_config_file)]
        cmd += ["--file-system-poll-wait-s", str(self.poll_wait_s), "--model-config-file-poll-wait-s", str(self.poll_wait_s)]
        return cmd + self.extra_args

    def start(self, timeout_s: float = 60.0) -> ModelServerProcess:
        """Starts the server and waits until it is ready (see wait_ready)."""
        if self._proc is not None and self._proc.poll() is None:
            raise ModelServerError(f"model server already running (pid {self._proc.pid})")
        env = dict(os.environ if self.env is None else self.env)
        # Keep TF quiet and off any GPU; the repository root on the path makes `esp`/`serving` importable.
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root
            )
        log.info("started model server pid %d, log %s", self._proc.pid, self.log_path)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise
        return self

    def _log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log_text().splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits for the "serving model ..." line, then for the gRPC health check to say SERVING."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise ModelServerError(
                    f"model server exited with code {self._proc.returncode} before it was ready; log:\n{self.log_tail()}"
                )
            match = _READY.search(self._log_text())
            if match:
                self.port = int(match.group(3))
                if health_check(self.target, timeout_s=1.0):
                    return
            if time.monotonic() > deadline:
                raise ModelServerError(f"model server not ready after {timeout_s:g} s; log:\n{self.log_tail()}")
            time.sleep(0.1)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("model server pid %d ignored SIGTERM for %.0f s; killing it", self._proc.pid, grace_s)
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL now: what a crash or an OOM kill looks like to clients."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self, timeout_s: float = 60.0) -> ModelServerProcess:
        """Stops the server if it runs and starts a new process on the same port."""
        self.stop()
        return self.start(timeout_s)

    def __enter__(self) -> ModelServerProcess:
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
