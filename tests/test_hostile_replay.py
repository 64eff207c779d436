"""`esp dead-letters` against hostile letters and hostile arguments, on the real Pub/Sub emulator.

What a producer (or anyone who can publish to the dead-letter topic) can put in a letter must not
stop an export or a replay, and a replay must never send letters where they lose their verdict or
come back for ever. Helpers from tests/test_dead_letters.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from esp.contracts import (
    ATTR_ENVELOPE,
    ATTR_REPLAY_COUNT,
    ENVELOPE_MAGIC,
    MAX_REPLAY_COUNT,
    UNREADABLE,
    ErrorType,
    Stage,
)
from tests.test_dead_letters import (
    FAST,
    drain,
    fresh,
    held,
    publish_raw,
    run_cli,
    settings_args,
    worker_dead_letter,
)

# A comment whose id is a lone surrogate written as a JSON escape: valid UTF-8 bytes on the wire,
# refused by the contract (unencodable_text), so any producer can put it on the dead-letter topic.
SURROGATE_BODY = b'{"id": "\\ud800", "text": "hi"}'


def _cli(command: str, s: Any, *args: str) -> subprocess.CompletedProcess:
    """`esp dead-letters COMMAND` as its own process: real stdout, real exit code."""
    argv = [sys.executable, "-m", "esp.cli.main", "dead-letters", command, *settings_args(s, FAST), *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)


def test_a_comment_id_utf8_cannot_carry_does_not_stop_export_or_show(emulator: Any, tmp_path: Path) -> None:
    s = fresh(emulator)
    [poison_id, plain_id] = publish_raw(s, s.dead_letter_topic, [
        worker_dead_letter(None, body=SURROGATE_BODY, stage=Stage.VALIDATE, error_type=ErrorType.UNENCODABLE_TEXT,
                           reason="'id' is not valid Unicode: lone surrogate U+D800 at character 0"),
        worker_dead_letter("plain-1"),
    ])  # fmt: skip

    out = tmp_path / "incident.jsonl"
    exported = _cli("export", s, str(out))
    assert exported.returncode == 0 and "Traceback" not in exported.stderr, exported.stderr
    records = {r["message_id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert set(records) == {poison_id, plain_id}
    assert records[poison_id]["data"].encode("utf-8") == SURROGATE_BODY, "the body is kept byte for byte"

    shown = _cli("show", s, "--json", poison_id)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    [record] = json.loads(shown.stdout)
    assert record["data"].encode("utf-8") == SURROGATE_BODY
    assert len(held(s)) == 2, "looking and exporting consume nothing"


def _envelope(attributes_json: bytes, body: bytes) -> tuple[bytes, dict[str, str], str]:
    """A letter in ESP's envelope form, made by hand: its header holds whatever it was given."""
    data = ENVELOPE_MAGIC + b'{"attributes":' + attributes_json + b"}\n" + body
    attrs = {"esp_stage": Stage.SCORE, "esp_error_type": ErrorType.MODEL_REJECTED, "esp_reason": "by hand", ATTR_ENVELOPE: "1"}
    return data, attrs, ""


@pytest.mark.parametrize(
    "header",
    [
        b'{"a":"\\ud800"}',  # a value UTF-8 cannot carry
        b'{"\\udfff":"v"}',  # a name UTF-8 cannot carry
        b'{"googlike":"v","goog":"x"}',  # names Pub/Sub refuses
        b'{"k":"' + b"v" * 1025 + b'"}',  # a value over Pub/Sub's 1,024 bytes
    ],
)
def test_an_envelope_holding_attributes_pubsub_cannot_carry_is_left_and_the_rest_replays(
    emulator: Any, tmp_path: Path, header: bytes
) -> None:
    s = fresh(emulator)
    [hostile_id, *_] = publish_raw(s, s.dead_letter_topic, [
        _envelope(header, b'{"id": "env-1", "text": "hi"}'),
        worker_dead_letter("ok-1"),
        worker_dead_letter("ok-2"),
    ])  # fmt: skip

    result = _cli("replay", s)
    assert "Traceback" not in result.stderr and "STOPPED" not in result.stdout, result.stdout + result.stderr
    assert "replayed 2" in result.stdout and "1 cannot be replayed" in result.stdout, result.stdout
    replayed = sorted(json.loads(m.message.data)["id"] for m in drain(s, "tap-" + s.subscription))
    assert replayed == ["ok-1", "ok-2"]

    # The hostile one is still there, readable, with what went wrong named, and exportable whole.
    [left] = held(s)
    assert left.message_id == hostile_id and left.dead_letter.error_type == UNREADABLE and not left.dead_letter.replayable
    out = tmp_path / "left.jsonl"
    assert _cli("export", s, str(out)).returncode == 0
    [record] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert record["data"].encode("utf-8").startswith(ENVELOPE_MAGIC), "the whole envelope is kept as the body"


@pytest.mark.parametrize(
    "args, named",
    [
        (lambda s: ["--to", s.dead_letter_topic], "--to"),
        (lambda s: ["--to", f"projects/{s.project}/topics/{s.dead_letter_topic}"], "--to"),
        (lambda s: ["--to", s.scores_topic], "--to"),
        (lambda s: ["--to", ""], "--to"),  # `--to "$TOPIC"` with TOPIC unset replayed to the comments topic
        (lambda s: ["--park-topic", s.comments_topic], "--park-topic"),
        (lambda s: ["--to", "elsewhere", "--park-topic", s.comments_topic], "--park-topic"),
        (lambda s: ["--to", "elsewhere", "--park-topic", "elsewhere"], "--park-topic"),
    ],
)
def test_replay_refuses_topics_that_would_lose_the_verdict_or_loop(emulator: Any, args: Any, named: str) -> None:
    s = fresh(emulator)
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter("again-1"), worker_dead_letter("loop-1", replay_count=3)])
    result = _cli("replay", s, *args(s))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in result.stderr, result.stderr
    letters = {x.comment_id: x.dead_letter for x in held(s)}
    assert {cid: (d.replay_count, d.parked, d.reason) for cid, d in letters.items()} == {
        "again-1": (0, False, "model rejected the comment: INVALID_ARGUMENT"),
        "loop-1": (3, False, "model rejected the comment: INVALID_ARGUMENT"),
    }, "nothing changed"
    assert drain(s, "tap-" + s.subscription, idle_s=0.3) == []


def test_with_the_default_topics_the_same_letters_replay_and_park(emulator: Any) -> None:
    """The control for the test above: one letter is replayed to the comments topic, the other parked."""
    s = fresh(emulator)
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter("again-1"), worker_dead_letter("loop-1", replay_count=3)])
    result = run_cli("replay", s)
    assert result.exit_code == 0 and "replayed 1" in result.stdout and "parked 1" in result.stdout, result.output
    [msg] = drain(s, "tap-" + s.subscription)
    assert json.loads(msg.message.data)["id"] == "again-1" and msg.message.attributes[ATTR_REPLAY_COUNT] == "1"
    [letter] = held(s)
    assert letter.comment_id == "loop-1" and letter.dead_letter.parked and letter.dead_letter.replay_count == 3


def test_a_letter_replayed_as_often_as_a_count_is_believed_is_not_replayed_again(emulator: Any) -> None:
    """esp_replay_count is read up to 1000 (contracts.MAX_REPLAY_COUNT). Sent with 1001, the comment
    came back as a fresh letter with count 0 (the 1001 read as the producer's own attribute), so a
    poison forced on with --include-parked started its history again and cycled for ever."""
    s = fresh(emulator)
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter("worn-1", replay_count=MAX_REPLAY_COUNT, parked=True),
                                         worker_dead_letter("worn-2", replay_count=MAX_REPLAY_COUNT - 1, parked=True)])
    result = run_cli("replay", s, "--include-parked")
    assert result.exit_code == 0, result.output
    assert "replayed 1" in result.stdout and "1 cannot be replayed" in result.stdout, result.stdout
    [msg] = drain(s, "tap-" + s.subscription)
    assert json.loads(msg.message.data)["id"] == "worn-2" and msg.message.attributes[ATTR_REPLAY_COUNT] == str(MAX_REPLAY_COUNT)
    [left] = held(s)
    assert left.comment_id == "worn-1" and left.dead_letter.replay_count == MAX_REPLAY_COUNT and left.dead_letter.parked
