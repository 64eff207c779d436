"""The local stack: real services started as child processes for the demo, tests and benchmarks.

`ManagedProcess` starts a command, waits until a readiness probe answers (with a timeout, never a
fixed sleep) and stops exactly the process it started, by pid. `PubSubEmulator` runs Google's
Pub/Sub emulator on a free loopback port. The model server (`serving.local`) and the worker build on
the same class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess  # nosec B404: starts the local stack's own services (emulator, esp serve, worker), fixed argv
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from esp.errors import ServiceUnreachable
from esp.settings import PubSubSettings

log = logging.getLogger(__name__)

EMULATOR_BIN = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> None:
    """Polls `condition` until it is true; raises TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


class ManagedProcess:
    """A child process with a readiness probe; stopped by its own pid, never by name."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 60.0,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._ready = ready
        self._env = dict(env) if env is not None else None
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self._cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def command(self) -> list[str]:
        """The argv to run; subclasses may wrap it (e.g. in `taskset`)."""
        return self.argv

    def start(self) -> ManagedProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} already running (pid {self.proc.pid})")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
        out = self._log_file if self._log_file is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(  # nosec B603: argv built by ESP for its own services, no shell
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,
        )
        log.info("started %s (pid %d)", self.name, self.proc.pid)
        try:
            wait_until(self._ready_or_dead, timeout_s=self.start_timeout_s, what=f"{self.name} to become ready")
        except TimeoutError:
            self.stop()
            raise ServiceUnreachable(f"{self.name} did not become ready within {self.start_timeout_s:.0f}s{self._log_hint()}") from None
        if self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            raise ServiceUnreachable(f"{self.name} exited with code {code} during start-up{self._log_hint()}")
        return self

    def _log_hint(self) -> str:
        if self.log_path is None:
            return ""
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            return ""
        return f" (log {self.log_path}: {' | '.join(tail)})" if tail else f" (log {self.log_path})"

    def _ready_or_dead(self) -> bool:
        return self.proc is None or self.proc.poll() is not None or self._ready()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Asks the process to stop (SIGTERM), then kills it after `timeout_s`. Returns its exit code."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout=timeout_s if sig != signal.SIGKILL else None)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", self.name, proc.pid, timeout_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            code = proc.returncode
            log.info("stopped %s (pid %d, exit %s)", self.name, proc.pid, code)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def kill(self) -> None:
        """SIGKILL now, no grace: what a crash or an OOM kill looks like to the process's peers."""
        ManagedProcess.stop(self, timeout_s=0.0, sig=signal.SIGKILL)

    def restart(self) -> ManagedProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PubSubEmulator(ManagedProcess):
    """Google's Pub/Sub emulator on 127.0.0.1:<free port>.

    The launcher script execs java, so the pid we hold is the server's own and stopping it leaves
    nothing behind (unlike `gcloud beta emulators pubsub start`).
    """

    def __init__(self, port: int | None = None, *, log_path: Path | None = None, start_timeout_s: float = 60.0) -> None:
        if not EMULATOR_BIN.exists():
            raise ServiceUnreachable(
                f"the Pub/Sub emulator is not installed ({EMULATOR_BIN} missing): install the Debian package "
                "google-cloud-cli-pubsub-emulator (see README, Prerequisites)"
            )
        self.port = port or free_port()
        super().__init__(
            "pubsub-emulator",
            [str(EMULATOR_BIN), "--host=127.0.0.1", f"--port={self.port}"],
            ready=self._answers,
            log_path=log_path,
            start_timeout_s=start_timeout_s,
        )

    @property
    def host(self) -> str:
        """The value for PUBSUB_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as resp:  # nosec B310: fixed http:// URL of our own emulator
                return resp.status == 200
        except OSError:
            return False


def isolated_pubsub_settings(emulator_host: str, *, prefix: str = "esp", **overrides: object) -> PubSubSettings:
    """PubSubSettings on an emulator whose project and resource names no other run uses.

    Tests and benchmarks share one emulator; unique names keep their messages apart.
    """
    tag = uuid.uuid4().hex[:10]
    values: dict[str, object] = dict(
        project=f"{prefix}-{tag}",
        emulator_host=emulator_host,
        comments_topic=f"comments-{tag}",
        scores_topic=f"scores-{tag}",
        dead_letter_topic=f"dead-letter-{tag}",
        subscription=f"comments-scoring-{tag}",
        dead_letter_subscription=f"dead-letter-hold-{tag}",
    )
    values.update(overrides)
    return PubSubSettings(**values)  # type: ignore[arg-type]
