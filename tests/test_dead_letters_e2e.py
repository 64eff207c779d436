"""The on-call story end to end: a bad model version rejects some comments, the real worker
dead-letters them with reasons, the model is fixed, `esp dead-letters replay` sends them back, and
every comment ends up scored: none left on the dead-letter subscription, none lost.

Real everything: the Pub/Sub emulator, `esp serve` over gRPC on a model base path, `esp worker run`
as a process, and the dead-letter CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from esp.contracts import KIND_WORKER, ErrorType, Stage
from esp.localstack import wait_until
from esp.pubsub import subscriber_client
from esp.settings import PubSubSettings
from serving.local import ModelServerProcess
from tests.fixtures.model_server import model_client_settings
from tests.fixtures.models import export_test_model
from tests.fixtures.pubsub import create_subscription
from tests.fixtures.worker import fast_worker_settings, jigsaw_comments
from tests.test_dead_letters import fresh, held, publish_raw, run_cli
from worker.local import WorkerProcess

pytestmark = pytest.mark.slow

MARKER = "ESP-REJECT-ME"


class Scores:
    """Reads the scores topic through its own subscription, keeping every record."""

    def __init__(self, s: PubSubSettings) -> None:
        self.s = s
        self.sub = create_subscription(s, s.scores_topic, "scores-" + s.subscription)
        self.records: list[dict[str, Any]] = []

    def pull(self) -> None:
        from google.api_core import exceptions as gexc

        client = subscriber_client(self.s)
        path = self.s.subscription_path(self.sub)
        try:
            resp = client.pull(request={"subscription": path, "max_messages": 1000}, timeout=0.5, retry=None)
            if resp.received_messages:
                client.acknowledge(request={"subscription": path, "ack_ids": [m.ack_id for m in resp.received_messages]})
                self.records.extend(json.loads(m.message.data) for m in resp.received_messages)
        except gexc.DeadlineExceeded:
            pass
        finally:
            client.close()

    def wait_for(self, ids: set[str], timeout_s: float) -> None:
        def have_all() -> bool:
            self.pull()
            return ids <= {r["id"] for r in self.records}

        wait_until(have_all, timeout_s=timeout_s, interval_s=0, what=f"scores for {len(ids)} comments")


def test_bad_model_rejects_then_fixed_model_and_replay_scores_everything(
    emulator: Any,
    tmp_path: Path,
    start_model_server: Callable[..., ModelServerProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    from serving.client import TFServingScorer

    base = tmp_path / "bert"
    export_test_model(base, 1, reject_marker=MARKER)  # the bad deploy
    server = start_model_server(base)
    s = fresh(emulator)
    scores = Scores(s)
    start_worker(s, model_client_settings(server), *fast_worker_settings(worker_id="dl-e2e"))

    comments = jigsaw_comments(40)
    rejected = {cid for i, (cid, _) in enumerate(comments) if i % 5 == 0}
    bodies = [
        (json.dumps({"id": cid, "text": f"{text} {MARKER}" if cid in rejected else text}).encode(), {"app": "e2e"}, "")
        for cid, text in comments
    ]
    publish_raw(s, s.comments_topic, bodies)

    # The good ones are scored by version 1; the rejected ones are retried, then dead-lettered by the
    # worker itself on their last delivery attempt, with the model's reason.
    good = {cid for cid, _ in comments} - rejected
    scores.wait_for(good, timeout_s=60)
    wait_until(
        lambda: {x.comment_id for x in held(s)} >= rejected, timeout_s=60, interval_s=0.5, what="the rejected comments' dead letters"
    )
    stats = json.loads(run_cli("stats", s, "--json").stdout)
    assert stats["total"] == len(rejected)
    [group] = stats["groups"]
    assert (group["kind"], group["stage"], group["error_type"]) == (KIND_WORKER, Stage.SCORE, ErrorType.MODEL_REJECTED)
    assert all(MARKER in reason for reason in group["reasons"]), group["reasons"]
    rows = json.loads(run_cli("list", s, "--json").stdout)
    assert {r["comment_id"] for r in rows} == rejected
    assert all(r["delivery_attempts"] == s.max_delivery_attempts for r in rows)

    # The fix: version 2 without the defect; wait until the server answers with it.
    export_test_model(base, 2)
    probe = TFServingScorer(server.target, timeout_s=5.0, retry_budget_s=1.0)
    try:

        def serves_v2() -> bool:
            try:
                return probe.predict([f"probe {MARKER}"]).model_version == 2
            except Exception:  # version 1 still answering (rejects) or the switch in progress
                return False

        wait_until(serves_v2, timeout_s=60, interval_s=0.2, what="the model server to serve version 2")
    finally:
        probe.close()

    result = run_cli("replay", s, "--rate", "50")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"replayed {len(rejected)} ")

    scores.wait_for(rejected, timeout_s=60)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in scores.records:
        by_id.setdefault(record["id"], []).append(record)
    assert set(by_id) == {cid for cid, _ in comments}, "every comment scored, none lost"
    assert all(rec["model"]["version"] == 2 for cid in rejected for rec in by_id[cid])
    assert held(s) == [], "no dead letter left"
    duplicates = sum(len(v) for v in by_id.values()) - len(by_id)
    print(f"\ne2e: {len(rejected)} rejected, dead-lettered and replayed; {duplicates} duplicate score(s)")
