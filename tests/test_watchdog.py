"""The suite's watchdog (tests/fixtures/watchdog.py): a test hung where pytest-timeout's alarm cannot reach
it fails once, with its stacks, and the run goes on and ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HUNG_FILE = '''
import signal
import time


def test_before():
    pass


def test_hung_where_no_alarm_reaches():
    # SIGALRM blocked: what a main thread stuck in C++ looks like to pytest-timeout.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(120)


def test_after():
    pass
'''


OTHER_FILE = '''
import time

import pytest


def test_other():
    pass


@pytest.mark.timeout(12)
def test_with_a_longer_timeout_of_its_own():
    # Past the ini's 2 s and its 4 s of grace: the watchdog takes this test's own limit.
    time.sleep(7)
'''


def run_suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\ntimeout = 2\nhard_timeout_grace = 4\n")
    (suite / "test_hung.py").write_text(HUNG_FILE)
    (suite / "test_other.py").write_text(OTHER_FILE)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.fixtures.watchdog", "-p", "no:cacheprovider", "-q", *args],
        cwd=suite, env=env, capture_output=True, text=True, timeout=240,
    )
    return done, scratch


def test_a_test_hung_beyond_the_alarm_fails_once_with_its_stacks_and_the_run_ends(tmp_path: Path) -> None:
    done, scratch = run_suite(tmp_path, "-n", "2", "--dist", "loadfile")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 4 passed" in out, out
    # Counted in the failures section only: the short summary repeats the message in full where CI is set
    # (pytest truncates it to the terminal's width elsewhere).
    failures = out.partition("short test summary info")[0]
    assert failures.count("crashed while running 'test_hung.py::test_hung_where_no_alarm_reaches'") == 1, out
    assert "test_hung.py::test_hung_where_no_alarm_reaches was still running after 6 s" in out, out
    assert 'test_hung.py", line 13 in test_hung_where_no_alarm_reaches' in out, out
    assert not list(scratch.glob("esp-pytest-watchdog-*")), "the watchdog's folder outlived the run"


def test_in_one_process_the_stacks_reach_the_terminal_and_the_run_stops(tmp_path: Path) -> None:
    done, scratch = run_suite(tmp_path, "-p", "no:xdist")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Timeout (0:00:06)!" in done.stderr, done.stderr
    assert 'test_hung.py", line 13 in test_hung_where_no_alarm_reaches' in done.stderr, done.stderr
    assert not list(scratch.glob("esp-pytest-watchdog-*"))


@pytest.mark.parametrize(("grace", "error"), [
    ("soon", "must be a number of seconds, not 'soon'"),
    ("nan", "must be 0 or more seconds, not 'nan'"),
    ("inf", "must be 0 or more seconds, not 'inf'"),
    ("-1", "must be 0 or more seconds, not '-1'"),
])
def test_a_hard_timeout_grace_that_is_no_duration_is_one_line(grace: str, error: str, tmp_path: Path) -> None:
    done, _ = run_suite(tmp_path, "-p", "no:xdist", "-o", f"hard_timeout_grace={grace}")
    assert done.returncode == 4, done.stdout + done.stderr
    assert f"hard_timeout_grace {error}" in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
