"""TF Serving's `tensorflow_model_server` command line, run by `esp serve`.

`python -m serving.tensorflow_model_server --port=8500 --rest_api_port=8501 ...` takes the flags
exactly as the model image's entrypoint gives them (serving/Dockerfile), checks each against the
flags TF Serving 2.21 accepts (serving/config/tensorflow_model_server-2.21.flags), and runs
`esp serve` with the same ports, paths and values. That is how the manifest tests run the TF
Serving Deployment on a machine where TF Serving cannot be installed.

Stricter than TF Serving on purpose: TF Serving prints "unknown argument" for a flag it does not
know and starts anyway, so a misspelt flag in the image would be silently ignored in production;
here it is an error. A real flag that `esp serve` cannot honour is an error too, and flags that do
not change what a client sees (thread counts, warmup, cache flushing) are accepted and noted.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from esp.errors import ConfigError

FLAGS_FILE = Path(__file__).resolve().parent / "config" / "tensorflow_model_server-2.21.flags"

# TF Serving flag -> the `esp serve` option that does the same.
TRANSLATED = {
    "port": "--port",
    "rest_api_port": "--rest-api-port",
    "model_name": "--model-name",
    "model_base_path": "--model-base-path",
    "model_config_file": "--model-config-file",
    "model_config_file_poll_wait_seconds": "--model-config-file-poll-wait-s",
    "file_system_poll_wait_seconds": "--file-system-poll-wait-s",
    "enable_batching": "--enable-batching",
    "batching_parameters_file": "--batching-parameters-file",
    "monitoring_config_file": "--monitoring-config-file",
    "grpc_max_threads": "--server-threads",
    "grpc_channel_arguments": "--grpc-channel-arguments",
    "ssl_config_file": "--ssl-config-file",
}

# Accepted, with why they change nothing a client of `esp serve` can observe.
NO_EFFECT = {
    "enable_model_warmup": "esp serve always replays a version's warmup records",
    "num_request_iterations_for_warmup": "esp serve replays each warmup record once",
    "enable_grpc_healthcheck_service": "esp serve always serves grpc.health.v1",
    "rest_api_num_threads": "esp serve's REST endpoint starts a thread per request",
    "rest_api_timeout_in_ms": "esp serve's REST endpoint serves only status and metadata",
    "flush_filesystem_caches": "a TF Serving memory optimisation",
    "remove_unused_fields_from_bundle_metagraph": "a TF Serving memory optimisation",
    "num_load_threads": "esp serve loads versions one at a time",
    "num_unload_threads": "esp serve unloads versions one at a time",
    "tensorflow_session_parallelism": "TensorFlow's thread pools size themselves",
    "tensorflow_intra_op_parallelism": "TensorFlow's thread pools size themselves",
    "tensorflow_inter_op_parallelism": "TensorFlow's thread pools size themselves",
    "enable_profiler": "no profiler service in esp serve",
}

# TF Serving's defaults where they differ from esp serve's, applied when the flag is absent, so an
# absent flag means what it means in TF Serving (e.g. the model config is read once, not polled).
TF_SERVING_DEFAULTS = {
    "port": "8500",
    "rest_api_port": "0",
    "model_name": "default",
    "model_config_file_poll_wait_seconds": "0",
    "file_system_poll_wait_seconds": "1",
    "enable_batching": "false",
}

_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    type: str  # C++ type as in TF Serving's source: bool, int32, int64_t, float, string
    default: str


def known_flags(path: Path = FLAGS_FILE) -> dict[str, Flag]:
    """The checked-in list of tensorflow_model_server's flags, by name."""
    flags = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, type_, default = line.split("\t")
        flags[name] = Flag(name, type_, default)
    return flags


def parse(argv: Sequence[str], flags: dict[str, Flag] | None = None) -> dict[str, str]:
    """TF Serving's flag syntax: `--name=value`, and `--name` alone for a bool. Values as given."""
    flags = known_flags() if flags is None else flags
    values: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"tensorflow_model_server takes only --flag=value arguments, not {arg!r}")
        name, sep, value = arg[2:].partition("=")
        flag = flags.get(name)
        if flag is None:
            raise ConfigError(f"--{name} is not a tensorflow_model_server 2.21 flag (see {FLAGS_FILE.name})")
        if flag.type == "bool":
            value = value.lower() if sep else "true"
            if value not in _TRUE | _FALSE:
                raise ConfigError(f"--{name} takes true or false, not {value!r}")
        elif not sep:
            raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
        elif flag.type in ("int32", "int64_t"):
            try:
                int(value)
            except ValueError:
                raise ConfigError(f"--{name} takes an integer, not {value!r}") from None
        values[name] = value
    return values


def to_serve_args(argv: Sequence[str]) -> list[str]:
    """The `esp serve` arguments that do what these tensorflow_model_server flags do."""
    values = {**TF_SERVING_DEFAULTS, **parse(argv)}
    if "model_config_file" in values:
        # As in TF Serving: the config file wins over --model_name/--model_base_path.
        values.pop("model_name", None)
        values.pop("model_base_path", None)
    args: list[str] = []
    for name, value in values.items():
        if name in NO_EFFECT:
            continue
        option = TRANSLATED.get(name)
        if option is None:
            raise ConfigError(f"--{name} is a TF Serving flag that esp serve does not support")
        if option == "--enable-batching":
            args.append(option if value in _TRUE else "--no-enable-batching")
        else:
            args += [option, value]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from esp.cli.main import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = to_serve_args(argv)
    except ConfigError as exc:
        print(f"tensorflow_model_server (esp serve): error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    cli(["serve", *args], prog_name="esp")


if __name__ == "__main__":
    main()
