"""Distillation: teachers' probabilities as soft targets, cross-fitted so no row is scored by a
teacher that trained on it.

A fine-tuned teacher's outputs on its own training rows sit close to the labels (it has fitted
them), so they carry little that the labels do not. Cross-fitting fixes that: the training split
is cut into K folds by a hash of the id (`fold_of`), teacher k trains on every fold but k
(`esp train --cross-fit-fold k/K`, recorded in its model info) and gives soft targets only for
fold k. Together, K teachers cover every training row with an out-of-fold prediction.

Soft targets come from the exported SavedModels' signature (what ships), and are cached under the
cache directory keyed by the teachers' files and the rows, so several students reuse one scoring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teachers cannot give trustworthy soft targets for these rows; the message says why."""


def fold_of(comment_id: str, folds: int) -> int:
    """The cross-fit fold of a row, 1..folds: a hash of its id, salted so that folds are independent
    of the train/dev/test split (which hashes the bare id)."""
    digest = hashlib.sha256(b"esp-cross-fit:" + comment_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % folds + 1


def fold_mask(ids: Sequence[str], fold: int, folds: int) -> np.ndarray:
    """True for the rows of `fold`."""
    return np.fromiter((fold_of(i, folds) == fold for i in ids), dtype=bool, count=len(ids))


@dataclasses.dataclass(frozen=True)
class Teacher:
    version_dir: Path
    labels: tuple[str, ...]
    cross_fit: tuple[int, int] | None  # (fold held out, folds); None: trained on every row
    profile: str | None


def load_teacher(path: str | os.PathLike[str]) -> Teacher:
    from esp.scoring import ModelNotFound
    from serving.saved_model_files import resolve_version_dir
    from training.export import read_model_info

    try:
        version_dir, _ = resolve_version_dir(path)
    except ModelNotFound as exc:
        raise TeacherError(f"teacher {path}: {exc}") from None
    try:
        info = read_model_info(version_dir)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"{version_dir}: no readable assets.extra/esp_model_info.json ({exc})") from None
    cross = info.get("cross_fit")
    profile = info.get("profile")
    return Teacher(
        version_dir=version_dir,
        labels=tuple(info["labels"]),
        cross_fit=(int(cross["fold"]), int(cross["folds"])) if cross else None,
        profile=profile.get("name") if isinstance(profile, dict) else profile,
    )


def assign_rows(teachers: Sequence[Teacher], ids: Sequence[str], allow_in_sample: bool) -> list[np.ndarray]:
    """For each teacher, the rows whose soft targets it gives: out-of-fold rows first; a teacher
    that trained on everything only fills rows no cross-fit teacher covers, and only if allowed."""
    n = len(ids)
    taken = np.zeros(n, bool)
    masks = [np.zeros(n, bool) for _ in teachers]
    for i, t in enumerate(teachers):
        if t.cross_fit is not None:
            mask = fold_mask(ids, *t.cross_fit) & ~taken
            masks[i] = mask
            taken |= mask
    in_sample = [i for i, t in enumerate(teachers) if t.cross_fit is None]
    if in_sample and not allow_in_sample:
        t = teachers[in_sample[0]]
        raise TeacherError(
            f"{t.version_dir} trained on every training row, so its outputs there are close to the labels: train cross-fit "
            "teachers (esp train --cross-fit-fold 1/2, then 2/2) or pass --allow-in-sample-teacher"
        )
    for i in in_sample:
        masks[i] = ~taken
        taken |= masks[i]
    if not taken.all():
        folds = sorted({t.cross_fit for t in teachers if t.cross_fit})
        raise TeacherError(
            f"{int((~taken).sum())} of {n} training rows have no teacher that held them out (teachers hold out {folds}): "
            "give one teacher per fold, k/K for every k"
        )
    return masks


def _cache_key(teachers: Sequence[Teacher], ids: Sequence[str], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for t in teachers:
        for path in sorted(p for p in t.version_dir.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(t.version_dir)).encode())
            digest.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        digest.update(repr(t.cross_fit).encode())
    for i, text in zip(ids, texts):
        digest.update(i.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:32]


def soft_targets(
    teacher_paths: Sequence[str],
    ids: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_in_sample: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Soft targets [rows, labels] (in `labels` order) and a summary for the model info."""
    from training.evaluate import score_saved_model
    from training.preprocess import DEFAULT_CACHE_DIR

    if not teacher_paths:
        raise TeacherError("no teacher given")
    teachers = [load_teacher(p) for p in teacher_paths]
    for t in teachers:
        missing = [l for l in labels if l not in t.labels]
        if missing:
            raise TeacherError(f"{t.version_dir} has no output for {', '.join(missing)} (its labels: {', '.join(t.labels)})")
    masks = assign_rows(teachers, ids, allow_in_sample)
    summary = {
        "teachers": [
            {"version_dir": str(t.version_dir), "profile": t.profile, "cross_fit": ({"fold": t.cross_fit[0], "folds": t.cross_fit[1]} if t.cross_fit else None),
             "rows": int(m.sum())}
            for t, m in zip(teachers, masks)
        ],
        "in_sample_rows": int(sum(m.sum() for t, m in zip(teachers, masks) if t.cross_fit is None)),
    }
    cache = Path(cache_dir or DEFAULT_CACHE_DIR) / "soft-targets"
    key = _cache_key(teachers, ids, texts)
    cached = cache / f"{key}.npy"
    if cached.is_file():
        targets = np.load(cached)
        if targets.shape == (len(ids), len(labels)):
            logger.info("soft targets from the cache (%s)", cached)
            return targets, {**summary, "cache": str(cached)}
    targets = np.full((len(ids), len(labels)), np.nan, np.float32)
    for t, mask in zip(teachers, masks):
        rows = np.nonzero(mask)[0]
        if not len(rows):
            continue
        logger.info("teacher %s scores %d training rows", t.version_dir, len(rows))
        teacher_labels, probs, _ = score_saved_model(t.version_dir, [texts[i] for i in rows], progress=progress)
        order = [list(teacher_labels).index(l) for l in labels]
        targets[rows] = probs[:, order]
    if not np.isfinite(targets).all():
        raise TeacherError("a teacher returned non-finite probabilities")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.npy"
    np.save(tmp, targets)
    os.replace(tmp, cached)
    return targets, {**summary, "cache": str(cached)}
