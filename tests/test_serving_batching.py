"""serving.batching.BatchScheduler with a tiny real model (a doubling function), and the config readers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from esp.errors import ConfigError
from serving.batching import BatchingError, BatchingOptions, BatchScheduler
from serving.model_config import read_batching_parameters, read_model_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serving" / "config"


class Doubler:
    """Doubles its input; records the size of every batch it ran; can be told to fail or block."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.fail_on: float | None = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key, inputs):
        self.gate.wait(10)
        x = inputs["x"]
        self.batches.append(len(x))
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError(f"refusing {self.fail_on}")
        return {"y": x * 2, "n": np.full([len(x)], len(x))}


def _concurrently(scheduler, requests):
    results: dict[int, object] = {}

    def one(i, arr):
        try:
            results[i] = scheduler.submit("k", {"x": arr})
        except Exception as exc:  # recorded for the assertions
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_requests_share_batches():
    model = Doubler()
    model.gate.clear()  # hold the first batch so the rest queue up behind it
    sched = BatchScheduler(model, BatchingOptions(max_batch_size=64, max_execution_batch_size=8, batch_timeout_micros=50_000, num_batch_threads=1))
    try:
        requests = [np.array([float(i)]) for i in range(16)]
        timer = threading.Timer(0.2, model.gate.set)
        timer.start()
        results = _concurrently(sched, requests)
    finally:
        sched.close()
    for i in range(16):
        assert results[i]["y"].tolist() == [2.0 * i]
    assert sum(model.batches) == 16
    assert max(model.batches) <= 8
    assert len(model.batches) < 16  # some requests were merged


def test_large_request_is_split_and_reassembled():
    model = Doubler()
    sched = BatchScheduler(model, BatchingOptions(max_batch_size=100, max_execution_batch_size=4, batch_timeout_micros=0, num_batch_threads=2))
    try:
        out = sched.submit("k", {"x": np.arange(10, dtype=np.float64)})
    finally:
        sched.close()
    assert out["y"].tolist() == [2.0 * i for i in range(10)]
    assert max(model.batches) <= 4 and sum(model.batches) == 10


def test_too_large_request_is_refused_without_splitting():
    sched = BatchScheduler(Doubler(), BatchingOptions(max_batch_size=4, enable_large_batch_splitting=False, num_batch_threads=1))
    try:
        with pytest.raises(BatchingError) as info:
            sched.submit("k", {"x": np.arange(5.0)})
        assert info.value.code == "INVALID_ARGUMENT"
        assert sched.submit("k", {"x": np.arange(4.0)})["y"].tolist() == [0.0, 2.0, 4.0, 6.0]
    finally:
        sched.close()


def test_a_failed_batch_answers_every_member():
    model = Doubler()
    model.fail_on = 3.0
    model.gate.clear()
    sched = BatchScheduler(model, BatchingOptions(max_execution_batch_size=8, batch_timeout_micros=100_000, num_batch_threads=1))
    try:
        timer = threading.Timer(0.2, model.gate.set)
        timer.start()
        results = _concurrently(sched, [np.array([float(i)]) for i in range(6)])
    finally:
        sched.close()
    assert len(results) == 6
    failed = [i for i, r in results.items() if isinstance(r, ValueError)]
    assert 3 in failed
    assert all(isinstance(r, (dict, ValueError)) for r in results.values())


def test_full_queue_is_unavailable():
    model = Doubler()
    model.gate.clear()
    sched = BatchScheduler(model, BatchingOptions(max_execution_batch_size=2, max_enqueued_batches=1, batch_timeout_micros=0, num_batch_threads=1))
    try:
        results = _concurrently_until_refused(sched, model)
    finally:
        model.gate.set()
        sched.close()
    assert any(isinstance(r, BatchingError) and r.code == "UNAVAILABLE" for r in results)


def _concurrently_until_refused(sched, model):
    results = []
    threads = []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: _record(results, sched, i))
        t.start()
        threads.append(t)
    # Wait (bounded) until a refusal arrives, then let the held batches finish.
    for _ in range(100):
        if any(isinstance(r, BatchingError) for r in results):
            break
        threading.Event().wait(0.02)
    model.gate.set()
    for t in threads:
        t.join(10)
    return results


def _record(results, sched, i):
    try:
        results.append(sched.submit("k", {"x": np.array([float(i)])}))
    except BatchingError as exc:
        results.append(exc)


def test_empty_request_runs_alone():
    model = Doubler()
    sched = BatchScheduler(model, BatchingOptions(num_batch_threads=1))
    try:
        assert sched.submit("k", {"x": np.zeros([0])})["y"].shape == (0,)
    finally:
        sched.close()


def test_production_config_files_parse(tmp_path):
    # Its base path is on Cloud Storage; esp serve reads it from a local stand-in directory.
    sources = read_model_config(CONFIG_DIR / "models.config", gcs_local_dir=str(tmp_path))
    assert [s.name for s in sources] == ["bert"]
    bert = sources[0]
    assert bert.base_path == str(tmp_path / "YOUR_BUCKET" / "models" / "bert")
    assert bert.policy == "specific" and bert.labels["stable"] in bert.specific_versions
    opts = read_batching_parameters(CONFIG_DIR / "batching_parameters.txt", BatchingOptions())
    assert opts.enable_large_batch_splitting and opts.max_execution_batch_size <= opts.max_batch_size


def test_bad_config_files_are_config_errors(tmp_path):
    bad = tmp_path / "models.config"
    bad.write_text("model_config_list { config { name: 'x' base_path: '/m' unknown_field: 1 } }")
    with pytest.raises(ConfigError, match="not a TF Serving model config"):
        read_model_config(bad)
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 8 }\nfrobnicate { value: 1 }\n")
    with pytest.raises(ConfigError, match="frobnicate"):
        read_batching_parameters(params, BatchingOptions())
