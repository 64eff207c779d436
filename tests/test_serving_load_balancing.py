"""Load spreads over every TF Serving replica: two `esp serve` processes behind one multi-address
target, as the workers see the pods of the headless Service.

- round-robin gives each a fair share (pick_first, the gRPC default, gives one of them all);
- the servers close connections after grpc.max_connection_age_ms (as serving/Dockerfile tells TF
  Serving to) and clients reconnect: many connections per server, and not one call fails;
- when one server is killed, traffic carries on on the other, still without a failed call.

Each server sits behind a forwarder that counts the TCP connections made to it.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from esp.localstack import free_port
from serving.client import TFServingScorer
from serving.local import ModelServerProcess
from tests.fixtures.cluster import Forward

MAX_CONNECTION_AGE_MS = 1000


def _predicts_ok(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        page = response.read().decode()
    m = re.search(r'^esp_serve_requests_total\{code="OK",method="Predict"\} (\S+)$', page, re.M)
    return float(m.group(1)) if m else 0.0


def _drive(scorer: TFServingScorer, seconds: float, threads: int = 2) -> tuple[int, list[str]]:
    """Calls Predict from `threads` threads for `seconds`; returns (calls made, failures)."""
    calls, failures = [0], []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < deadline:
            try:
                scorer.predict(["a comment to spread around"])
                with lock:
                    calls[0] += 1
            except Exception as exc:  # every failure is recorded and fails the test
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return calls[0], failures


def test_round_robin_spreads_reconnects_and_survives_a_kill(
    test_model_base: Path, start_model_server: Callable[..., ModelServerProcess]
) -> None:
    servers, metrics, forwards = [], [], []
    for _ in range(2):
        port = free_port()
        servers.append(start_model_server(test_model_base, extra_args=[
            "--metrics-port", str(port),
            "--grpc-channel-arguments", f"grpc.max_connection_age_ms={MAX_CONNECTION_AGE_MS},grpc.max_connection_age_grace_ms=5000",
        ]))
        metrics.append(port)
        forwards.append(Forward(None, 0, None, servers[-1].port))
    target = "ipv4:" + ",".join(f"127.0.0.1:{f.port}" for f in forwards)
    try:
        # pick_first, gRPC's default: every call to one server.
        before = [_predicts_ok(p) for p in metrics]
        with TFServingScorer(target, load_balancing="pick_first", retry_budget_s=10) as scorer:
            for _ in range(20):
                scorer.predict(["one server takes all"])
        shares = sorted(_predicts_ok(p) - b for p, b in zip(metrics, before))
        assert shares == [0, 20], shares

        # round_robin: a fair share each, across many reconnects, nothing failing.
        before = [_predicts_ok(p) for p in metrics]
        connections_before = [f.connections for f in forwards]
        with TFServingScorer(target, load_balancing="round_robin", retry_budget_s=10) as scorer:
            calls, failures = _drive(scorer, seconds=5 * MAX_CONNECTION_AGE_MS / 1000)
            assert not failures, failures[:5]
            counts = [_predicts_ok(p) - b for p, b in zip(metrics, before)]
            assert sum(counts) == calls
            assert all(c >= 0.3 * calls for c in counts), f"unfair split {counts} of {calls}"
            reconnects = [f.connections - b for f, b in zip(forwards, connections_before)]
            assert all(r >= 3 for r in reconnects), f"connections per server {reconnects}: max age did not close them"

            # One replica dies: the other takes everything, and no call fails.
            servers[1].kill()
            survivor_before = _predicts_ok(metrics[0])
            calls, failures = _drive(scorer, seconds=3)
            assert not failures, failures[:5]
            assert calls > 0 and _predicts_ok(metrics[0]) - survivor_before == calls
    finally:
        for f in forwards:
            f.close()
