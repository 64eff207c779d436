"""TF Serving's configuration files, read the way TF Serving reads them.

- models.config (`--model_config_file`): a ModelServerConfig in protobuf text format, parsed with
  tensorflow-serving-api's own message, so a file `esp serve` accepts is one TF Serving accepts.
- batching_parameters.txt (`--batching_parameters_file`): TF Serving's BatchingParameters text
  format. That message is not in tensorflow-serving-api, so the few fields ESP uses are read here
  (`name { value: N }` wrappers and `name: N` scalars); an unknown field is an error, not ignored.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from google.protobuf import text_format

from esp.errors import ConfigError
from serving.batching import BatchingOptions


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model to serve: where its versions live, which to load, and its version labels."""

    name: str
    base_path: str
    policy: str = "latest"  # latest | all | specific
    num_latest: int = 1
    specific_versions: frozenset[int] = frozenset()
    labels: dict[str, int] = dataclasses.field(default_factory=dict)

    def desired(self, on_disk: list[int]) -> set[int]:
        """The versions this policy wants loaded, given those present on disk."""
        if self.policy == "all":
            return set(on_disk)
        if self.policy == "specific":
            return {v for v in on_disk if v in self.specific_versions}
        return set(sorted(on_disk)[-self.num_latest :]) if on_disk else set()


def read_model_config(path: str | Path, *, gcs_local_dir: str | None = None) -> list[ModelSource]:
    """Parses a TF Serving models.config (ModelServerConfig, text format).

    A gs://BUCKET/PATH base path is read from `gcs_local_dir`/BUCKET/PATH (a local stand-in for
    Cloud Storage); without it, a gs:// base path is a ConfigError, since only TF Serving reads gs://.
    """
    from tensorflow_serving.config import model_server_config_pb2

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read model config {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a text file ({exc.reason} at byte {exc.start})") from None
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{p}: not a TF Serving model config: {exc}") from None
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{p}: only model_config_list is supported")
    sources = []
    seen = set()
    for mc in config.model_config_list.config:
        if not mc.name or not mc.base_path:
            raise ConfigError(f"{p}: every model needs a name and a base_path")
        if mc.name in seen:
            raise ConfigError(f"{p}: model {mc.name!r} is configured twice")
        seen.add(mc.name)
        if mc.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{p}: model {mc.name!r}: only model_platform 'tensorflow' is served")
        if mc.base_path.startswith("gs://"):
            if gcs_local_dir is None:
                raise ConfigError(
                    f"{p}: model {mc.name!r}: base_path {mc.base_path} is on Cloud Storage; "
                    "give --gcs-local-dir to read it from a local copy"
                )
            mc.base_path = str(Path(gcs_local_dir) / mc.base_path[len("gs://") :])
        base = Path(mc.base_path)
        if not base.is_absolute():
            base = (p.parent / base).resolve()  # relative to the config file, for local use
        policy = mc.model_version_policy
        which = policy.WhichOneof("policy_choice")
        if which == "specific":
            versions = frozenset(policy.specific.versions)
            if not versions:
                raise ConfigError(f"{p}: model {mc.name!r}: a specific policy needs versions")
            source = ModelSource(mc.name, str(base), "specific", specific_versions=versions, labels=dict(mc.version_labels))
        elif which == "all":
            source = ModelSource(mc.name, str(base), "all", labels=dict(mc.version_labels))
        else:
            n = policy.latest.num_versions if which == "latest" and policy.latest.num_versions else 1
            source = ModelSource(mc.name, str(base), "latest", num_latest=n, labels=dict(mc.version_labels))
        sources.append(source)
    if not sources:
        raise ConfigError(f"{p}: no models configured")
    return sources


_WRAPPED = re.compile(r"^(\w+)\s*\{\s*value\s*:\s*([^\s}]+)\s*\}$")
_SCALAR = re.compile(r"^(\w+)\s*:\s*(\S+)$")
_INT_FIELDS = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads", "max_execution_batch_size"}
_BOOL_FIELDS = {"enable_large_batch_splitting", "pad_variable_length_inputs"}
# Accepted because production files carry them; they do not change what `esp serve` computes.
_IGNORED_FIELDS = {"pad_variable_length_inputs", "allowed_batch_sizes", "thread_pool_name"}


def read_batching_parameters(path: str | Path, defaults: BatchingOptions) -> BatchingOptions:
    """Reads TF Serving's batching_parameters.txt over `defaults`."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read batching parameters {p}: {exc.strerror}") from None
    values: dict[str, object] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _WRAPPED.match(line) or _SCALAR.match(line)
        if not m:
            raise ConfigError(f"{p}:{number}: cannot read {raw.strip()!r}")
        name, value = m.group(1), m.group(2).strip("\"'")
        if name in _IGNORED_FIELDS:
            continue
        if name in _INT_FIELDS:
            try:
                values[name] = int(value)
            except ValueError:
                raise ConfigError(f"{p}:{number}: {name} must be an integer, got {value!r}") from None
        elif name in _BOOL_FIELDS:
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{p}:{number}: {name} must be true or false, got {value!r}")
            values[name] = value.lower() == "true"
        else:
            raise ConfigError(f"{p}:{number}: unknown batching parameter {name!r}")
    try:
        return dataclasses.replace(defaults, **values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None
