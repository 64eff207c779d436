"""`esp serve` is never a zombie and fails start-up cleanly.

- If a part it needs (the gRPC server, the model poller, an HTTP endpoint) dies while it runs,
  its gRPC health check answers NOT_SERVING, TF Serving's REST model status answers 503, and
  serve_forever returns the reason, which `esp serve` turns into one line and a non-zero exit.
- A start-up failure (a port in use, a missing model directory or config file, a bad TLS file)
  ends with one line on stderr and a non-zero exit, not a traceback: run through the real CLI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esp.localstack import free_port, wait_until
from serving.client import health_check
from serving.model_config import ModelSource
from serving.server import ModelServer, ServerConfig, serve_forever

REPO = Path(__file__).resolve().parents[1]


def _rest_status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/bert", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture
def server(test_model_base: Path) -> Iterator[ModelServer]:
    config = ServerConfig(
        sources=[ModelSource("bert", str(test_model_base))],
        port=0,
        rest_port=free_port(),
        metrics_port=free_port(),
        poll_wait_s=0.05,
        supervise_interval_s=0.05,
        grace_s=1.0,
    )
    server = ModelServer(config)
    server.start()
    try:
        assert health_check(f"127.0.0.1:{server.port}", timeout_s=5)
        assert _rest_status(server.rest_port) == 200
        yield server
    finally:
        server.stop()


def _kill_poller(server: ModelServer) -> None:
    def broken() -> None:
        raise RuntimeError("a bug in the poller")

    # A fault where no one expects one: the next polling pass raises out of the thread.
    server.manager.reconcile_all = broken  # type: ignore[method-assign]


def _kill_endpoint(name: str) -> Callable[[ModelServer], None]:
    def kill(server: ModelServer) -> None:
        endpoint = next(e for e in server._endpoints if e.name == name)
        endpoint.stop()  # behind the server's back: its thread ends

    return kill


def _kill_grpc(server: ModelServer) -> None:
    assert server._server is not None
    server._server.stop(0)


KILLS: dict[str, Callable[[ModelServer], None]] = {
    "model poller": _kill_poller,
    "REST endpoint": _kill_endpoint("REST API"),
    "metrics endpoint": _kill_endpoint("metrics"),
    "gRPC server": _kill_grpc,
}


@pytest.mark.parametrize("part", list(KILLS))
def test_a_dead_part_fails_health_and_status(server: ModelServer, part: str) -> None:
    KILLS[part](server)
    wait_until(lambda: server.failure() is not None, timeout_s=10, what=f"the server to notice its {part} died")
    assert not server.is_serving()
    if part != "gRPC server":
        assert not health_check(f"127.0.0.1:{server.port}", timeout_s=5), "gRPC health still says SERVING"
    if part != "REST endpoint":
        assert _rest_status(server.rest_port) == 503, "REST model status still answers"
    # Once failing, always failing: a restart, not a recovery, brings it back.
    assert server.failure() is not None


def test_serve_forever_returns_why_it_stopped(test_model_base: Path) -> None:
    config = ServerConfig(sources=[ModelSource("bert", str(test_model_base))], port=0, poll_wait_s=0.05, supervise_interval_s=0.05, grace_s=1.0)
    server = ModelServer(config)
    result: list[str | None] = []

    def killed_once_ready(s: ModelServer) -> None:
        _kill_poller(s)

    done = threading.Event()
    # serve_forever installs signal handlers, so it runs here, in the main thread; a watchdog
    # ends the test if it never returns.
    watchdog = threading.Timer(60, lambda: done.is_set() or os.kill(os.getpid(), signal.SIGTERM))
    watchdog.start()
    try:
        result.append(serve_forever(server, on_ready=killed_once_ready, on_change=lambda s: None))
    finally:
        done.set()
        watchdog.cancel()
    assert result[0] is not None and "poller" in result[0]


def test_sigterm_is_a_clean_stop_not_a_failure(test_model_base: Path) -> None:
    config = ServerConfig(sources=[ModelSource("bert", str(test_model_base))], port=0, poll_wait_s=0.05, grace_s=1.0)
    server = ModelServer(config)
    result = serve_forever(server, on_ready=lambda s: os.kill(os.getpid(), signal.SIGTERM), on_change=lambda s: None)
    assert result is None


# ---------------------------------------------------------------------------------------------
# The real CLI, in subprocesses


def _run_cli(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "serve", *args], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
    )


def _assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("esp: ")]
    assert len(lines) == 1 and lines[0].startswith("esp: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_grpc_port_in_use(test_model_base: Path, taken_port: int) -> None:
    result = _run_cli(["--model-base-path", str(test_model_base), "--port", str(taken_port)])
    _assert_one_line_failure(result, f"127.0.0.1:{taken_port}", "gRPC")


def test_rest_port_in_use(test_model_base: Path, taken_port: int) -> None:
    result = _run_cli(["--model-base-path", str(test_model_base), "--port", str(free_port()), "--rest-api-port", str(taken_port)])
    _assert_one_line_failure(result, f"127.0.0.1:{taken_port}", "REST")


def test_metrics_port_in_use(test_model_base: Path, taken_port: int) -> None:
    result = _run_cli(["--model-base-path", str(test_model_base), "--port", str(free_port()), "--metrics-port", str(taken_port)])
    _assert_one_line_failure(result, f"127.0.0.1:{taken_port}", "metrics")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model-base-path", "/nonexistent/models/bert"], "/nonexistent/models/bert"),
        (["--model-config-file", "/nonexistent/models.config"], "/nonexistent/models.config"),
        (["--model-config-file", str(REPO / "serving" / "config" / "models.config")], "--gcs-local-dir"),
        (["--model-base-path", str(REPO), "--tls-cert-file", "/nonexistent/cert.pem", "--tls-key-file", "/nonexistent/key.pem"], "/nonexistent/cert.pem"),
        (["--model-base-path", str(REPO), "--tls-cert-file", str(REPO / "README.md"), "--tls-key-file", str(REPO / "README.md")], "not a PEM file"),
        (["--model-base-path", str(REPO), "--ssl-config-file", str(REPO / "README.md")], "SSL config"),
        (["--model-base-path", str(REPO), "--monitoring-config-file", "/nonexistent/monitoring.config"], "monitoring config"),
        (["--model-base-path", str(REPO), "--grpc-channel-arguments", "max_connection_age_ms=1"], "grpc_channel_arguments"),
    ],
    ids=["model-dir", "config-file", "gs-config", "tls-missing", "tls-not-pem", "ssl-config", "monitoring-config", "channel-args"],
)
def test_bad_files_and_settings_fail_in_one_line(args: list[str], needle: str) -> None:
    _assert_one_line_failure(_run_cli(args, timeout_s=60), needle)


def test_the_tf_serving_command_line_refuses_an_unknown_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serving.tensorflow_model_server", "--port=8500", "--rest_api_prot=8501"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--rest_api_prot" in result.stderr


def test_a_port_taken_after_the_early_check_still_fails_cleanly(test_model_base: Path, taken_port: int) -> None:
    """The CLI tries ports before loading TensorFlow; the server's own bind is the last word."""
    from esp.errors import ConfigError

    for config in (
        ServerConfig(sources=[ModelSource("bert", str(test_model_base))], port=taken_port),
        ServerConfig(sources=[ModelSource("bert", str(test_model_base))], port=0, rest_port=taken_port),
    ):
        server = ModelServer(config)
        try:
            with pytest.raises(ConfigError, match=f"127.0.0.1:{taken_port}"):
                server.start()
        finally:
            server.stop()
