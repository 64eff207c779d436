"""`esp score`: a few strings by hand, through the model server over gRPC or in process, with the
same scores either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TEXTS = ["you are a complete idiot", "thanks for fixing the citation"]


def _score(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    return subprocess.run([sys.executable, "-m", "esp.cli.main", "score", *args], capture_output=True, text=True, env=env, timeout=180)


def _rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.rstrip().endswith(tuple(TEXTS))]


def test_score_through_the_server_equals_in_process(model_server, test_model_base: Path) -> None:  # type: ignore[no-untyped-def]
    remote = _score("--model-server", model_server.target, *TEXTS)
    local = _score("--saved-model", str(test_model_base), *TEXTS)
    assert remote.returncode == 0, remote.stderr
    assert local.returncode == 0, local.stderr
    assert len(_rows(remote.stdout)) == 2
    assert _rows(remote.stdout) == _rows(local.stdout)
    assert "model bert version 1" in remote.stdout


def test_score_refuses_a_label_without_a_server(test_model_base: Path) -> None:
    result = _score("--saved-model", str(test_model_base), "--model-version-label", "stable", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "esp: error: --model-version-label needs a model server; with --backend saved_model use --model-version"
    ]
