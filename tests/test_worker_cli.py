"""`esp worker run` settings and errors, and the JSON log format (no services needed)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from esp.errors import ConfigError
from esp.logs import configure_logging
from esp.settings import LogSettings, ModelClientSettings, build
from esp.settings import BatchingSettings
from esp.settings.worker import WorkerSettings
from worker.backends import build_scorer
from worker.local import settings_env


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "worker", "run", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--backend", "saved_model"], "--saved-model-dir"),
        (["--max-outstanding-messages", "4", "--max-batch-size", "8"], "max_outstanding_messages"),
        (["--lease-margin-s", "90"], "lease_margin_s"),
    ],
)
def test_bad_settings_fail_with_one_line(args: list[str], needle: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esp: error:") and needle in lines[0]


def test_version_label_needs_a_model_server() -> None:
    with pytest.raises(ConfigError):
        build_scorer(
            WorkerSettings(backend="saved_model", saved_model_dir="/nonexistent"),
            ModelClientSettings(model_version_label="stable"),
            BatchingSettings(),
        )


def test_tfserving_backend_imports_no_tensorflow() -> None:
    code = (
        "import sys\n"
        "from esp.settings import BatchingSettings, ModelClientSettings\n"
        "from esp.settings.worker import WorkerSettings\n"
        "from worker.backends import build_scorer\n"
        "import worker.service, esp.cli.main\n"
        "scorer, probe = build_scorer(WorkerSettings(), ModelClientSettings(model_version_label='stable'), BatchingSettings())\n"
        "assert scorer.version_label == 'stable' and scorer.retry_budget_s <= BatchingSettings().retry_max_backoff_s\n"
        "heavy = [m for m in ('tensorflow', 'numpy', 'apache_beam') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_settings_round_trip_through_the_environment() -> None:
    settings = WorkerSettings(worker_id="w-1", max_outstanding_messages=64)
    batching = BatchingSettings(max_batch_size=16, length_grouping=False, max_batch_latency_ms=7.5)
    env = settings_env(settings, batching)
    assert env["ESP_MAX_BATCH_SIZE"] == "16" and env["ESP_LENGTH_GROUPING"] == "false"
    assert "ESP_SAVED_MODEL_DIR" not in env
    from esp.settings import from_env

    assert from_env(WorkerSettings, env) == settings
    assert from_env(BatchingSettings, env) == batching


def test_json_logs_carry_batch_id_and_model_version() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(build(LogSettings, {"log_format": "json", "log_level": "INFO"}), stream=out)
        logging.getLogger("worker.test").info("scored %d", 32, extra={"batch_id": 7, "model_version": 3})
        logging.getLogger("worker.test").debug("hidden")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "scored 32" and entry["severity"] == "INFO" and entry["logger"] == "worker.test"
    assert entry["batch_id"] == 7 and entry["model_version"] == 3 and entry["time"].endswith("Z")


def test_a_metrics_port_in_use_fails_start_up_with_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli("--metrics-host", "127.0.0.1", "--metrics-port", str(port), "--emulator-host", "127.0.0.1:1")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("esp: error:") and f"127.0.0.1:{port}" in lines[0], result.stderr
    assert "in use" in lines[0]
