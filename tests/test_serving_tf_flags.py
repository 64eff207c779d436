"""serving.tensorflow_model_server: TF Serving's command line, checked against the flags 2.21
accepts and turned into the `esp serve` options that do the same."""

from __future__ import annotations

import pytest

from esp.errors import ConfigError
from serving import tensorflow_model_server as tfs
from tests.fixtures import cluster as local


def _dockerfile_flags() -> list[str]:
    dockerfile = local.parse_dockerfile(local.ROOT / "serving" / "Dockerfile")
    return dockerfile.entrypoint[1:]


def _options(args: list[str]) -> dict[str, str | None]:
    """`--name value` pairs and lone `--flag`s of an esp serve command line."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = None
            i += 1
    return out


def test_the_checked_in_list_is_tf_servings() -> None:
    flags = tfs.known_flags()
    assert len(flags) == 48
    assert flags["port"] == tfs.Flag("port", "int32", "8500")
    assert flags["model_config_file_poll_wait_seconds"].default == "0"
    assert flags["enable_batching"].type == "bool"


def test_the_image_flags_become_the_same_esp_serve_options() -> None:
    args = tfs.to_serve_args(_dockerfile_flags())
    pairs = _options(args)
    assert pairs["--port"] == "8500" and pairs["--rest-api-port"] == "8501"
    assert pairs["--model-config-file"] == "/config/models.config"
    assert pairs["--batching-parameters-file"] == "/config/batching_parameters.txt"
    assert pairs["--monitoring-config-file"] == "/config/monitoring.config"
    assert pairs["--model-config-file-poll-wait-s"] == "60"
    assert pairs["--server-threads"] == "64"
    assert "grpc.max_connection_age_ms=30000" in str(pairs["--grpc-channel-arguments"])
    assert "--enable-batching" in args


def test_tf_serving_defaults_apply_when_a_flag_is_absent() -> None:
    args = tfs.to_serve_args(["--model_base_path=/models/bert"])
    pairs = _options(args)
    assert pairs["--model-name"] == "default" and pairs["--port"] == "8500"
    assert pairs["--model-config-file-poll-wait-s"] == "0"
    assert "--no-enable-batching" in args


def test_the_config_file_wins_over_name_and_base_path() -> None:
    args = tfs.to_serve_args(["--model_config_file=/c", "--model_name=x", "--model_base_path=/m"])
    assert "--model-name" not in args and "--model-base-path" not in args


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rest_api_prot=8501"], "not a tensorflow_model_server 2.21 flag"),
        (["--port"], "needs a value"),
        (["--port=abc"], "takes an integer"),
        (["--enable_batching=maybe"], "takes true or false"),
        (["8500"], "only --flag=value"),
        (["--platform_config_file=/p"], "does not support"),
    ],
)
def test_bad_command_lines_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tfs.to_serve_args(argv)


def test_a_bare_bool_flag_is_true() -> None:
    assert tfs.parse(["--enable_batching"]) == {"enable_batching": "true"}
    assert "--enable-batching" in tfs.to_serve_args(["--enable_batching"])
