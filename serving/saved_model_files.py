"""A SavedModel's files, read without TensorFlow: its version directories, as TF Serving finds them,
and the signatures and labels its saved_model.pb declares.

Pre-flights (`esp backfill --backend saved_model`) read these before a job starts. Importing
TensorFlow made a refused backfill take 11.5 s instead of 3.0 (docs/backfill.md), so saved_model.pb
is parsed with ESP's own copy of the SavedModel message (serving/protos/esp_tfs.proto);
`serving.saved_model` parses it with TensorFlow's, through the same function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from esp.contracts import labels_from_outputs
from esp.scoring import ModelContractError, ModelNotFound

DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"
MAX_VERSION = 2**63 - 1  # versions are int64 on the wire


def version_dirs(base_path: str | os.PathLike) -> dict[int, Path]:
    """The version directories under a TF Serving base path that hold a saved_model.pb, by version.

    As TF Serving reads them: a name of ASCII digits that fits an int64 (`002` is version 2, from
    `002`); any other name (`²`, `1e3`, a 20-digit number) is not a version and is skipped, so a
    stray directory can neither stop new versions nor become the latest. Where two names give one
    number, the unpadded one wins.
    """
    base = Path(base_path)
    if not base.is_dir():
        return {}
    out: dict[int, Path] = {}
    for child in base.iterdir():
        name = child.name
        if not (name.isascii() and name.isdigit()) or int(name) > MAX_VERSION:
            continue
        version = int(name)
        if (child / "saved_model.pb").is_file() and (version not in out or name == str(version)):
            out[version] = child
    return out


def list_versions(base_path: str | os.PathLike) -> list[int]:
    """The version numbers under a TF Serving base path (see `version_dirs`), ascending."""
    return sorted(version_dirs(base_path))


def resolve_version_dir(path: str | os.PathLike, version: int | None = None) -> tuple[Path, int]:
    """Accepts a base path (picks `version` or the latest) or a version directory itself.

    A path the system cannot even look at (too long, unreadable) is ModelNotFound saying why, as a
    missing one is: every caller turns that into one line, where an OSError was a traceback."""
    try:
        return _resolve_version_dir(Path(path), version)
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise ModelNotFound(f"{shown}: {exc.strerror or exc}") from None


def _resolve_version_dir(p: Path, version: int | None) -> tuple[Path, int]:
    if (p / "saved_model.pb").is_file() and version is None:
        return p, int(p.name) if p.name.isascii() and p.name.isdigit() and int(p.name) <= MAX_VERSION else 0
    dirs = version_dirs(p)
    if version is not None:
        if version not in dirs:
            raise ModelNotFound(f"no version {version} under {p} (found {sorted(dirs)})")
        return dirs[version], version
    if not dirs:
        raise ModelNotFound(f"no model version (integer directory with saved_model.pb) under {p}")
    latest = max(dirs)
    return dirs[latest], latest


def stored_signature_defs(version_dir: str | os.PathLike, saved_model_message: Any = None) -> Any:
    """The serving graph's SignatureDef messages exactly as stored in saved_model.pb (what TF
    Serving's metadata returns), read without loading the graph.

    `saved_model_message` is the SavedModel message class to parse with: ESP's own (the default) or
    TensorFlow's (`serving.saved_model`, whose SignatureDefs go back over the wire whole)."""
    if saved_model_message is None:
        from serving.esp_tfs_pb2 import SavedModel as saved_model_message
    proto = saved_model_message()
    proto.ParseFromString((Path(version_dir) / "saved_model.pb").read_bytes())
    graphs = [g for g in proto.meta_graphs if SERVE_TAG in g.meta_info_def.tags] or list(proto.meta_graphs)
    if not graphs:
        raise ModelContractError(f"{version_dir}/saved_model.pb holds no graph")
    return graphs[0].signature_def


def stored_labels(path: str | os.PathLike, version: int | None = None, signature_name: str = DEFAULT_SIGNATURE) -> tuple[str, ...]:
    """The labels a SavedModel would score, from its saved_model.pb alone: a pre-flight reads them in
    well under a second, where loading the model takes seconds and its memory.

    Raises ModelNotFound (no such version or signature) or ModelContractError (no label outputs, or a
    saved_model.pb that does not parse)."""
    from google.protobuf.message import DecodeError

    directory, resolved = resolve_version_dir(path, version)
    try:
        signatures = stored_signature_defs(directory)
    except DecodeError:
        raise ModelContractError(f"{directory}/saved_model.pb cannot be read: it does not parse as a SavedModel") from None
    except OSError as exc:
        raise ModelContractError(f"{directory}/saved_model.pb cannot be read: {exc.strerror or exc}") from None
    if signature_name not in signatures:
        raise ModelNotFound(f"SavedModel {directory} has no signature {signature_name!r} (it has {sorted(signatures)})")
    labels = tuple(labels_from_outputs(list(signatures[signature_name].outputs)))
    if not labels:
        raise ModelContractError(f"SavedModel {directory} (version {resolved}) declares no label outputs")
    return labels
