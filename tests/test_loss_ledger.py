"""The loss ledger's short run (bench/loss_ledger.py): the real local stack under every kind of fault.

Two workers, `esp serve` and the emulator; the model server killed and frozen, a worker SIGKILLed
and SIGTERMed, the scores topic unavailable, a model version that rejects everything, hostile
bursts. The promise is checked by reconciling every id sent: lost = 0, poison dead-lettered with
its reason, no valid comment dead-lettered with one, duplicates within their bound. The 20-minute
run behind docs/reliability.md is the same script with a longer --duration-s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esp.scoring import CANARY_TEXTS, ModelRejected
from serving.client import TFServingScorer
from tests.fixtures.model_server import model_client_settings

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_version_that_rejects_everything_loads_and_rejects_everything(tmp_path: Path, start_model_server) -> None:  # type: ignore[no-untyped-def]
    # The ledger counts this fault as injected: it must be one. Its first bad version rejected
    # nothing (an empty marker was read as "no marker"), so no worker ever met it.
    from bench.loss_ledger import Config, prepare_models

    config = Config(duration_s=60, rate_per_s=40, poison_every=50, gap_s=1.5, hold_scale=0.4, settle_timeout_s=90,
                    model_dir=None, log_dir=tmp_path / "logs")
    _, _, bad, _ = prepare_models(config, tmp_path / "work")
    served = tmp_path / "served" / "bert"
    shutil.copytree(bad, served / "1")
    server = start_model_server(served)  # it loads: a version whose warm-up fails would never be served
    with TFServingScorer.from_settings(model_client_settings(server)) as scorer:
        for texts in (["an ordinary comment"], list(CANARY_TEXTS)):
            with pytest.raises(ModelRejected):
                scorer.predict(texts)


def test_nothing_is_lost_under_faults(tmp_path: Path) -> None:
    report_path = tmp_path / "ledger.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "loss_ledger.py"), "--test-model", "--duration-s", "60", "--rate", "40",
         "--gap-s", "1.5", "--hold-scale", "0.4", "--settle-timeout-s", "90", "--json", str(report_path),
         "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=420,
    )
    assert report_path.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    summary = {k: v for k, v in report.items() if k not in ("series", "events")}
    assert report["lost"] == 0, summary
    assert report["valid_dead_lettered_with_reason"] == [], summary
    assert report["poison_with_wrong_reason"] == [], summary
    assert report["poison_dead_lettered_with_reason"] + report["poison_forwarded_by_policy"] == report["sent"]["poison"]
    assert report["scored_valid"] == report["sent"]["valid"], summary
    assert report["duplicates"] <= report["duplicate_bound"], summary
    assert report["workers_ready_at_end"], summary
    for fault in ("model server killed", "worker SIGKILLed", "scores topic unavailable", "version that rejects everything",
                  "hostile burst", "model server frozen (SIGSTOP)"):
        assert report["faults"].get(fault, 0) >= 1, f"the short run never injected {fault!r}: {report['faults']}"
    assert report["promise_held"] and result.returncode == 0, summary
