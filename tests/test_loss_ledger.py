"""The loss ledger's short run (bench/loss_ledger.py): the real local stack under every kind of fault.

Two workers, `esp serve` and the emulator; the model server killed and frozen, a worker SIGKILLed
and SIGTERMed, the scores topic unavailable, a model version that rejects everything, hostile
bursts. The promise is checked by reconciling every id sent: lost = 0, poison dead-lettered with
its reason, no valid comment dead-lettered with one, duplicates within their bound. The 20-minute
run behind docs/reliability.md is the same script with a longer --duration-s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


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
