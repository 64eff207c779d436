"""Versions under traffic: a new version appears, a label moves, the server dies and comes back."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from esp.scoring import ModelUnavailable
from serving.client import TFServingScorer
from tests.fixtures.models import export_test_model


class Traffic:
    """Background threads scoring in a loop; records every version seen and every error."""

    def __init__(self, scorer: TFServingScorer, threads: int = 2) -> None:
        self.scorer = scorer
        self.versions: list[int] = []
        self.errors: list[BaseException] = []
        self.calls = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                out = self.scorer.predict([f"thread {i} request {n}", "you fool", "nice work"])
                with self._lock:
                    self.versions.append(out.model_version)
                    self.calls += 1
            except Exception as exc:  # counted: the test requires zero
                with self._lock:
                    self.errors.append(exc)
                    self.calls += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; errors: {self.errors[:3]}")
            time.sleep(0.05)

    def seen(self, version: int) -> int:
        with self._lock:
            return self.versions.count(version)


def test_new_version_under_traffic_latest_policy(tmp_path, start_model_server):
    base = tmp_path / "bert"
    export_test_model(base, 1)
    server = start_model_server(base)
    with TFServingScorer(server.target, retry_budget_s=5.0) as scorer:
        v1 = scorer.predict(["you fool"]).probabilities[0]
        with Traffic(scorer) as traffic:
            traffic.wait_for(lambda: traffic.seen(1) >= 20, 30, "traffic on version 1")
            export_test_model(base, 2, bias=1.5)
            traffic.wait_for(lambda: traffic.seen(2) >= 20, 60, "traffic on version 2")
        assert traffic.errors == []
        first_v2 = traffic.versions.index(2)
        # Once version 2 answered, version 1 answered at most the requests already in flight.
        assert traffic.versions[first_v2:].count(1) <= 2
        v2 = scorer.predict(["you fool"])
        assert v2.model_version == 2
        assert v2.probabilities[0][0] > v1[0]  # the bias shows: it is really the new model
        assert dict(scorer.model_status()) == {1: "END", 2: "AVAILABLE"}


def _write_config(path: Path, base: Path, versions: list[int], labels: dict[str, int]) -> None:
    lines = ["model_config_list {", "  config {", '    name: "bert"', f'    base_path: "{base}"',
             '    model_platform: "tensorflow"', "    model_version_policy { specific {"]
    lines += [f"      versions: {v}" for v in versions]
    lines += ["    } }"]
    for key, value in labels.items():
        lines += [f'    version_labels {{ key: "{key}" value: {value} }}']
    lines += ["  }", "}"]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic, as a ConfigMap update is


def test_label_moves_under_traffic(tmp_path, start_model_server):
    base = tmp_path / "bert"
    export_test_model(base, 1)
    export_test_model(base, 2, bias=1.5)
    config = tmp_path / "models.config"
    _write_config(config, base, [1, 2], {"stable": 1, "canary": 2})
    server = start_model_server(model_config_file=config)
    with TFServingScorer(server.target, version_label="stable", retry_budget_s=5.0) as stable, \
            TFServingScorer(server.target, version_label="canary") as canary:
        assert canary.predict(["x"]).model_version == 2
        with Traffic(stable) as traffic:
            traffic.wait_for(lambda: traffic.seen(1) >= 20, 30, "traffic on stable=1")
            _write_config(config, base, [1, 2], {"stable": 2, "canary": 2})
            traffic.wait_for(lambda: traffic.seen(2) >= 20, 30, "traffic on stable=2")
        assert traffic.errors == []
        first_v2 = traffic.versions.index(2)
        assert traffic.versions[first_v2:].count(1) <= 2
        assert stable.predict(["x"]).model_version == 2
        assert stable.check_ready() == 2


def test_server_killed_then_restarted(tmp_path, test_model_base, start_model_server):
    server = start_model_server(test_model_base)
    budget_s, timeout_s = 2.0, 1.0
    with TFServingScorer(server.target, retry_budget_s=budget_s, timeout_s=timeout_s) as scorer:
        with Traffic(scorer, threads=1) as traffic:
            traffic.wait_for(lambda: traffic.calls >= 10, 30, "traffic")
            killed_at = time.monotonic()
            server.kill()
            traffic.wait_for(lambda: traffic.errors, budget_s + timeout_s + 5, "the first error")
            first_error_after = time.monotonic() - killed_at
        assert all(isinstance(e, ModelUnavailable) for e in traffic.errors), traffic.errors[:3]
        assert first_error_after <= budget_s + timeout_s + 1.0

        started = time.monotonic()
        with pytest.raises(ModelUnavailable, match="UNAVAILABLE"):
            scorer.predict(["down"])
        assert time.monotonic() - started <= budget_s + timeout_s + 0.5
        with pytest.raises(ModelUnavailable):
            scorer.check_ready()

        server.start()  # same port: the same scorer (and channel) must find it again
        deadline = time.monotonic() + 30
        while True:
            try:
                out = scorer.predict(["back again"])
                break
            except ModelUnavailable:
                assert time.monotonic() < deadline, "the client never reconnected to the restarted server"
        assert out.model_version == 1
        assert scorer.check_ready() == 1
