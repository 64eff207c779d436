"""The `esp` command line as a user meets it: help everywhere, one-line errors, a fast start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import click.testing
import pytest

from esp import __version__
from esp.cli.main import cli
from esp.settings import ALL_GROUPS, describe

ROOT = Path(__file__).resolve().parents[1]


def _esp(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_") and k != "PUBSUB_EMULATOR_HOST"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "esp.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, cmd in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(cmd, click.Group):
            paths.extend(_command_paths(cmd, (*prefix, name)))
    return paths


def test_version() -> None:
    result = _esp("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"esp, version {__version__}"


@pytest.mark.parametrize("path", _command_paths(cli), ids=lambda p: " ".join(p))
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = click.testing.CliRunner().invoke(cli, [*path, "--help"], standalone_mode=False)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # A help line for every option, no undocumented flags.
    cmd = cli
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"


def test_help_does_not_load_heavy_libraries() -> None:
    probe = (
        "import sys; from esp.cli.main import cli; "
        "import click.testing; r = click.testing.CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; "
        "heavy = [m for m in ('tensorflow', 'apache_beam', 'google.cloud.pubsub_v1', 'keras', 'sklearn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"esp --help imported {result.stdout.strip()}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["pubsub", "init", "--bogus"], "No such option"),
        (["pubsub", "init", "--max-delivery-attempts", "two"], "'two' is not a valid integer"),
        (["pubsub", "init", "--max-delivery-attempts", "3"], "between 5 and 100"),
        (["publish", "/no/such/file.jsonl"], "no such file"),
        (["publish", "README.md"], "cannot tell the format"),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(args: list[str], message: str) -> None:
    result = _esp(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("esp: error:") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_environment_value_is_one_line() -> None:
    result = _esp("pubsub", "init", env_extra={"ESP_ACK_DEADLINE_S": "soon"})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "soon" in result.stderr


def test_unreachable_emulator_is_one_line(tmp_path: Path) -> None:
    from esp.localstack import free_port

    dead = f"127.0.0.1:{free_port()}"
    comments = tmp_path / "c.jsonl"
    comments.write_text('{"id": "a", "text": "hi"}\n')
    for args in (["pubsub", "init"], ["publish", str(comments)]):
        result = _esp(*args, env_extra={"PUBSUB_EMULATOR_HOST": dead}, timeout=30)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines == [f"esp: error: cannot reach the Pub/Sub emulator at {dead} (PUBSUB_EMULATOR_HOST): nothing is listening there"]


def test_config_lists_every_setting() -> None:
    result = _esp("config")
    assert result.returncode == 0
    for group in ALL_GROUPS:
        for s in describe(group):
            assert s.env in result.stdout


def test_readme_configuration_table_is_complete() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`((?:ESP_|PUBSUB_)[A-Z0-9_]+)`", readme))
    declared = {s.env for group in ALL_GROUPS for s in describe(group)}
    missing = sorted(declared - documented)
    assert not missing, f"README lacks {missing}: regenerate the table with `esp config --markdown`"


def test_command_options_read_their_derived_variable() -> None:
    result = _esp("config", env_extra={"ESP_CONFIG_AS_JSON": "1"})
    assert result.returncode == 0
    assert result.stdout.lstrip().startswith("[")
