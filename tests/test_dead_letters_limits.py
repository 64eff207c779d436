"""`esp dead-letters` at the edges: hostile letters crash no verb, scans end while letters keep
arriving, export keeps memory bounded, letters near 10 MB stay recoverable, and replay sends
exactly what the producer sent.

Against the real Pub/Sub emulator; helpers from tests/test_dead_letters.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from esp.contracts import ATTR_REPLAY_COUNT, KEPT_BODY_CUT, KIND_UNKNOWN, ErrorType, Stage, dead_letter_for
from esp.dead_letters import holding
from esp.dead_letters.hold import STOP_TIME
from esp.dead_letters.letters import Letter
from esp.dead_letters.replaying import _Publisher
from esp.fault_proxy import PUBLISH, FaultProxy, Rule, publish_containing
from esp.pubsub import publisher_client, subscriber_client
from esp.settings import DeadLetterSettings, PubSubSettings
from tests.fixtures.pubsub import pull_until
from tests.test_fuzz_dead_letters import received
from tests.test_dead_letters import FAST, drain, fresh, held, publish_raw, run_cli, settings_args, worker_dead_letter

ESC = "\x1b"


def _hostile_letters() -> list[tuple[bytes, dict[str, str], str]]:
    """What could be on a dead-letter topic, from damaged to malicious."""
    esp_garbage = {
        "esp_error_type": "x", "esp_delivery_attempt": "five", "esp_time": "0001-01-01T00:00:00+14:00",
        "esp_replay_count": "-1", "esp_parked": "maybe", "esp_kind": "robot",
    }  # fmt: skip
    return [
        (b"\x00\xff\xfe", esp_garbage, ""),
        (b"not an envelope", {"esp_error_type": "x", "esp_envelope": "1"}, ""),
        (b"x", {"esp_error_type": "x", "esp_kept": "body_cut", "esp_body_sha256": "zz", "esp_body_bytes": "-4"}, ""),
        (b"{}", {"esp_error_type": "e" + ESC + "[2J", "esp_reason": ESC + "[31mred\u202e\x07", "k" + ESC: "v\x00"}, ""),
        (b"plain text", {}, "ordering-ö" * 50),
        (b"[" * 100_000, {"esp_error_type": "invalid_json", "esp_stage": "validate"}, ""),
        (b'{"id": 1' + b"0" * 5000 + b', "text": "t"}', {"a": "b"}, ""),
        (b'{"id": "big-attrs", "text": "t"}', {f"{i:03d}" + "k" * 200: "v" * 1024 for i in range(100)}, ""),
        (b'{"id": "' + ESC.encode() + b']0;title\\u0007", "text": "t"}', {"esp_time": "9999-12-31T23:59:59-14:00"}, ""),
    ]


def test_no_letter_crashes_any_verb(emulator: Any, tmp_path: Path) -> None:
    s = fresh(emulator)
    hostile = _hostile_letters()
    ids = publish_raw(s, s.dead_letter_topic, hostile)
    n = len(hostile)

    def ok(command: str, *args: str) -> Any:
        result = run_cli(command, s, *args)
        assert result.exit_code == 0, f"{command} {args}: {result.output}"
        assert "Traceback" not in result.output
        return result

    for command in ("stats", "list"):
        assert ESC not in ok(command).stdout
        json.loads(ok(command, "--json").stdout)
    shown = ok("show", *ids)
    assert ESC not in shown.stdout and shown.stdout.count("\nmessage ") == n - 1
    assert "\\x1b" in shown.stdout  # escaped, still visible
    assert len(json.loads(ok("show", "--json", *ids).stdout)) == n
    out = tmp_path / "hostile.jsonl"
    assert f"exported {n} " in ok("export", str(out)).stdout
    assert len(out.read_text(encoding="utf-8").splitlines()) == n
    assert f"dry run: {n} of {n}" in ok("replay", "--dry-run").stdout
    replay = ok("replay")
    # Three stay: two whose body cannot be told (a damaged envelope, a damaged cut marker) and the
    # one with 100 attributes (no room for the replay count). The rest go.
    assert f"replayed {n - 3}" in replay.stdout and "3 cannot be replayed" in replay.stdout
    assert len(drain(s, "tap-" + s.subscription)) == n - 3
    assert "purged 3 " in ok("purge", "--yes").stdout
    assert held(s) == []


def test_replay_republishes_exactly_what_the_producer_sent(emulator: Any) -> None:
    s = fresh(emulator)
    odd = {
        "timeout": "5", "data": "d", "topic": "t", "retry": "r", "ordering_key": "o",  # the client's keywords
        "esp_parked": "true", "esp_reason": "forged", "esp_orig.x": "y", "esp_replay_count": "x",  # ESP's namespace
        "CloudPubSubDeadLetterSourceDeliveryCount": "77", "é": "ü",
    }  # fmt: skip
    long_name = {"esp_" + "n" * 250: "v", "origin": "a"}  # 263 bytes once renamed: goes in the envelope
    crowded = {f"k{i:02d}": "v" * 100 for i in range(99)}  # with ESP's, more than 100 attributes
    publish_raw(
        s,
        s.dead_letter_topic,
        [
            worker_dead_letter("odd-1", attributes=odd, ordering_key="user-ö"),
            worker_dead_letter("long-1", attributes=long_name),
            worker_dead_letter("crowded-1", attributes=crowded),
        ],
    )
    result = run_cli("replay", s)
    assert result.exit_code == 0 and "replayed 3" in result.stdout, result.output
    got = {json.loads(m.message.data)["id"]: m.message for m in drain(s, "tap-" + s.subscription)}
    # The producer's invalid esp_replay_count was its own attribute; the replay's count replaces it.
    assert dict(got["odd-1"].attributes) == {**odd, ATTR_REPLAY_COUNT: "1"} and got["odd-1"].ordering_key == "user-ö"
    assert dict(got["long-1"].attributes) == {**long_name, ATTR_REPLAY_COUNT: "1"}
    assert dict(got["crowded-1"].attributes) == {**crowded, ATTR_REPLAY_COUNT: "1"}


def test_a_letter_too_large_to_keep_whole_is_listed_plainly_and_never_replayed_cut(emulator: Any) -> None:
    s = fresh(emulator)
    body = json.dumps({"id": "huge-1", "text": "y" * 9_999_800}).encode()  # fits alone, not with ESP's attributes
    letter = dead_letter_for(
        body, {f"attribute-{i:02d}": "v" * 1000 for i in range(80)}, stage=Stage.VALIDATE,
        error_type=ErrorType.BODY_TOO_LARGE, reason=f"body is {len(body)} bytes, the limit is 65536", worker="w",
    )  # fmt: skip
    # The largest kind of dead letter goes through the batching client, as the worker publishes it.
    [mid] = publish_raw(s, s.dead_letter_topic, [(*letter.to_message(), "")])
    [row] = json.loads(run_cli("list", s, "--json").stdout)
    assert row["kept"] == KEPT_BODY_CUT and row["error_type"] == ErrorType.BODY_TOO_LARGE
    table = run_cli("list", s).stdout
    assert f"[{KEPT_BODY_CUT}]" in table
    shown = run_cli("show", s, mid).stdout
    assert "body not kept" in shown and str(len(body)) in shown
    assert json.loads(run_cli("stats", s, "--json").stdout)["not_whole"] == 1
    replay = run_cli("replay", s)
    assert replay.exit_code == 0 and "replayed 0" in replay.stdout and "1 cannot be replayed" in replay.stdout
    assert drain(s, "tap-" + s.subscription, idle_s=0.5) == []
    [back] = held(s)
    assert back.body == body[: len(back.body)] and len(back.body) > 9_900_000


def test_a_scan_ends_while_letters_keep_arriving_and_holds_what_it_saw(emulator: Any) -> None:
    s = fresh(emulator)
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter(f"early-{i}") for i in range(20)])
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.wait(0.2):
            publish_raw(s, s.dead_letter_topic, [worker_dead_letter(f"late-{i}")])
            i += 1

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    dl = DeadLetterSettings(dead_letter_lease_s=10, pull_idle_s=1.0, max_scan_s=4.0)
    competitor = subscriber_client(s)
    stolen: set[str] = set()
    seen: set[str] = set()
    try:
        started = time.monotonic()
        with holding(s, dl, "scanning") as session:
            for batch in session.scan():
                seen |= {x.message_id for x in batch}
                if len(seen) >= 20 and not stolen:
                    # Another reader of the same subscription gets nothing the scan holds.
                    resp = competitor.pull(request={"subscription": session.path, "max_messages": 100}, timeout=5)
                    stolen = {m.message.message_id for m in resp.received_messages} or {"nothing"}
                    if resp.received_messages:
                        competitor.modify_ack_deadline(
                            request={"subscription": session.path, "ack_ids": [m.ack_id for m in resp.received_messages],
                                     "ack_deadline_seconds": 0}
                        )  # fmt: skip
                    held_then = set(seen)
            elapsed, stopped_by = time.monotonic() - started, session.stopped_by
        assert stopped_by == STOP_TIME and 4.0 <= elapsed < 9.0, (stopped_by, elapsed)
        assert stolen and not (stolen & held_then)
        # The CLI says so, and exits normally.
        result = run_cli("list", s, "--max-scan-s", "3", "--pull-idle-s", "1")
        assert result.exit_code == 0 and "stopped after --max-scan-s 3" in result.stderr, result.output
    finally:
        stop.set()
        feeder.join(timeout=10)
        competitor.close()


# Runs `esp` and writes its own peak resident memory (VmHWM) to the file named first. Not the
# rusage of a child: Linux counts the forking parent's memory (pytest's, large by now) in it.
_MEASURED_ESP = """
import sys
from esp.cli.main import main
report = sys.argv.pop(1)
try:
    main()
finally:
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def _peak_rss_mib(args: list[str], tmp_path: Path) -> float:
    """Runs `esp ARGS...` in a process of its own and returns its peak resident memory."""
    report = tmp_path / "vmhwm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_") and k != "PUBSUB_EMULATOR_HOST"}
    done = subprocess.run([sys.executable, "-c", _MEASURED_ESP, str(report), *args], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    return int(report.read_text()) / 1024  # VmHWM is in KiB


def test_export_streams_to_disk_with_bounded_memory(emulator: Any, tmp_path: Path) -> None:
    """Exporting 120 MiB of dead letters takes no more memory than exporting 30 MiB: what one pull
    and one record need, whatever the export's size. Holding the bodies (as export once did) would
    add the 90 MiB difference."""
    s = fresh(emulator)
    args = ["dead-letters", "export", *settings_args(s, FAST), "--force"]
    chunk = os.urandom(3 * 1024 * 1024)  # random bytes: base64 in the file, as incompressible as it gets

    def letters(first: int, n: int) -> list[tuple[bytes, dict[str, str], str]]:
        return [worker_dead_letter(None, body=bytes([i]) + chunk, stage=Stage.VALIDATE, error_type=ErrorType.INVALID_UTF8,
                                   reason="bad") for i in range(first, first + n)]  # fmt: skip

    peaks = {}
    for total, first, n in ((10, 0, 10), (40, 10, 30)):
        publish_raw(s, s.dead_letter_topic, letters(first, n))
        out = tmp_path / f"export-{total}.jsonl"
        peaks[total] = _peak_rss_mib([*args, str(out)], tmp_path)
        assert len(out.read_bytes().splitlines()) == total
    more_mib = 30 * len(chunk) / 2**20
    print(f"\nexport peak RSS: {peaks[10]:.0f} MiB for 10 letters of 3 MiB, {peaks[40]:.0f} MiB for 40")
    # Half the 90 MiB: alone the two peaks are within 6 MiB of each other, but beside the rest of the
    # suite one CI run measured 24 MiB more for 40 (allocator arenas, a pull cut off and repeated).
    # Holding the bodies adds at least the whole 90 MiB, so this still fails for that.
    assert peaks[40] - peaks[10] < 0.5 * more_mib


@pytest.fixture
def through_proxy(emulator: Any) -> Iterator[tuple[PubSubSettings, FaultProxy]]:
    """Fresh topics on the emulator, and settings whose calls cross esp.fault_proxy (faults by rule)."""
    proxy = FaultProxy(emulator.host).start()
    try:
        s = fresh(emulator)
        yield dataclasses.replace(s, emulator_host=proxy.host, pubsub_timeout_s=3.0), proxy
    finally:
        proxy.stop()


def _publisher(settings: PubSubSettings) -> _Publisher:
    from google.pubsub_v1 import PublisherClient

    return _Publisher(PublisherClient(transport=publisher_client(settings).transport), settings)


def _window(n: int, poison: int | None = None, size: int = 1) -> list[tuple[Letter, dict[str, Any]]]:
    letters = [Letter.from_received(received(b"x", {}, message_id=str(i))) for i in range(n)]
    return [(x, {"data": str(i).encode() + (b"<<poison>>" if i == poison else b"x" * size), "attributes": {}})
            for i, x in enumerate(letters)]  # fmt: skip


def _arrived(settings: PubSubSettings, n: int) -> list[str]:
    return sorted(m.message.data[:1].decode() for m in pull_until(settings, "tap-" + settings.subscription, n, timeout_s=30))


def test_a_message_pubsub_refuses_is_found_by_splitting_and_the_rest_are_stored(through_proxy) -> None:
    s, proxy = through_proxy
    topic = s.topic_path(s.comments_topic)
    proxy.add(Rule(PUBLISH, grpc.StatusCode.INVALID_ARGUMENT, "a message Pub/Sub will not take (injected)",
                   publish_containing(topic, b"<<poison>>")))  # fmt: skip
    out = _publisher(s).publish(topic, _window(8, poison=5))
    assert [letter.message_id for letter, _ in out.stored] == ["0", "1", "2", "3", "4", "6", "7"]
    assert [letter.message_id for letter, _ in out.refused] == ["5"] and "InvalidArgument" in out.refused[0][1]
    assert out.error is None and out.unsent == []
    assert _arrived(s, 7) == ["0", "1", "2", "3", "4", "6", "7"], "what was reported stored is on the topic"


def test_when_the_topic_fails_mid_window_what_was_stored_is_still_reported_for_acking(through_proxy) -> None:
    s, proxy = through_proxy
    topic = s.topic_path(s.comments_topic)
    requests: list[bytes] = []

    def after_the_first_request(request: bytes) -> bool:
        requests.append(request)
        return len(requests) > 1

    proxy.add(Rule(PUBLISH, grpc.StatusCode.UNAVAILABLE, "the topic is gone (injected)", after_the_first_request))
    # Three requests of two 4 MB messages each (10 MB per request at most); the topic fails after the first.
    out = _publisher(s).publish(topic, _window(6, size=4_000_000))
    assert [letter.message_id for letter, _ in out.stored] == ["0", "1"]
    assert [letter.message_id for letter in out.unsent] == ["2", "3", "4", "5"]
    assert out.error and "the topic is gone" in out.error
    assert _arrived(s, 2) == ["0", "1"]


def test_a_message_someone_else_put_on_the_topic_is_listed_as_unknown(emulator: Any) -> None:
    s = fresh(emulator)
    publish_raw(s, s.dead_letter_topic, [(b"by hand", {"esp_parked": "true"}, "")])
    [row] = json.loads(run_cli("list", s, "--json", "--kind", "unknown").stdout)
    assert (row["kind"], row["parked"]) == (KIND_UNKNOWN, False)
