"""Bandit over ESP's packages: every finding is fixed, or justified where it is (`# nosec BXXX: why`).

Strict on purpose: all severities and confidences, every package. A justification names the check
it silences and says why, so a reviewer can judge it; a bare `# nosec` is refused.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("esp", "worker", "serving", "training", "beam_jobs")
JUSTIFIED = re.compile(r"#\s*nosec\s+B\d{3}(?:\s*,\s*B\d{3})*\s*:\s*\S.{4,}")
# Generated protobuf/gRPC code is not ESP's to justify.
GENERATED = re.compile(r"_pb2(_grpc)?\.py$")


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if not GENERATED.search(p.name)]


def test_bandit_finds_nothing_unjustified() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bandit", "--quiet", "--format", "json", "--exclude", "*_pb2.py,*_pb2_grpc.py", "-r", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    assert not report["errors"], report["errors"]
    findings = [
        f"{r['filename']}:{r['line_number']}: {r['test_id']} ({r['issue_severity']}/{r['issue_confidence']}) {r['issue_text']}"
        for r in report["results"]
    ]
    assert not findings, "fix these, or justify each in place with `# nosec BXXX: why`:\n" + "\n".join(findings)


def test_every_nosec_names_its_check_and_says_why() -> None:
    bare = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _sources()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "nosec" in line and not JUSTIFIED.search(line)
    ]
    assert not bare, "a `# nosec` must say which check and why (`# nosec B603: fixed argv, no shell`):\n" + "\n".join(bare)
