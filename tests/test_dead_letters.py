"""`esp dead-letters`: both kinds of dead letter are seen, filters are exact, looking changes
nothing, and replay loses nothing, not even when it is SIGKILLed half-way.

Everything runs against the real Pub/Sub emulator. The worker's dead letters are published the way
the worker writes them (esp.contracts.dead_letter_for(...).to_attributes()); policy-forwarded ones
are made for real, by nacking a comment on the worker's subscription until Pub/Sub moves it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click.testing
import pytest

from esp.cli.main import cli
from esp.contracts import (
    ATTR_PARKED,
    ATTR_REPLAY_COUNT,
    KIND_POLICY,
    KIND_WORKER,
    POLICY_DELIVERY_COUNT,
    POLICY_REASON,
    ErrorType,
    Stage,
    dead_letter_for,
)
from esp.dead_letters import UNREADABLE, Filter, Letter, in_flight_window, peek, record_data
from esp.pubsub import publisher_client, subscriber_client
from esp.pubsub_admin import init_resources
from esp.settings import DeadLetterSettings, PubSubSettings
from tests.fixtures.pubsub import create_subscription, unique_settings

# Short leases and idle windows keep the suite fast; 10 s is Pub/Sub's smallest lease.
FAST = DeadLetterSettings(dead_letter_lease_s=10, pull_idle_s=0.5)


# ---------------------------------------------------------------------------------------------
# Helpers (also used by tests/test_dead_letters_e2e.py)


def settings_args(s: PubSubSettings, dl: DeadLetterSettings = FAST) -> list[str]:
    """The CLI flags that point a command at these resources."""
    return [
        "--project", s.project,
        "--emulator-host", str(s.emulator_host),
        "--comments-topic", s.comments_topic,
        "--scores-topic", s.scores_topic,
        "--dead-letter-topic", s.dead_letter_topic,
        "--subscription", s.subscription,
        "--dead-letter-subscription", s.dead_letter_subscription,
        "--dead-letter-lease-s", str(dl.dead_letter_lease_s),
        "--pull-idle-s", str(dl.pull_idle_s),
    ]  # fmt: skip


def run_cli(command: str, s: PubSubSettings, *args: str, dl: DeadLetterSettings = FAST) -> click.testing.Result:
    """`esp dead-letters COMMAND ...` in-process, through the root group (exit codes included)."""
    argv = ["dead-letters", command, *settings_args(s, dl), *args]
    return click.testing.CliRunner().invoke(cli, argv, catch_exceptions=False)


def publish_raw(s: PubSubSettings, topic: str, messages: Sequence[tuple[bytes, dict[str, str], str]]) -> list[str]:
    """Publishes (data, attributes, ordering_key) messages; returns their message ids."""
    from google.cloud import pubsub_v1

    pub = publisher_client(s, publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))
    try:
        futures = [pub.publish(s.topic_path(topic), data, ordering_key=key, **attrs) for data, attrs, key in messages]
        return [f.result(timeout=30) for f in futures]
    finally:
        pub.stop()
        pub.transport.close()


def worker_dead_letter(
    cid: str | None,
    *,
    body: bytes | None = None,
    stage: str = Stage.SCORE,
    error_type: str = ErrorType.MODEL_REJECTED,
    reason: str = "model rejected the comment: INVALID_ARGUMENT",
    attributes: dict[str, str] | None = None,
    replay_count: int = 0,
    parked: bool = False,
    ordering_key: str = "",
) -> tuple[bytes, dict[str, str], str]:
    """A dead letter exactly as the worker writes one (original body and attributes + esp_*)."""
    data = body if body is not None else json.dumps({"id": cid, "text": f"text of {cid}"}).encode()
    original = dict(attributes or {})
    if replay_count:
        original[ATTR_REPLAY_COUNT] = str(replay_count)
    letter = dead_letter_for(
        data,
        original,
        stage=stage,
        error_type=error_type,
        reason=reason,
        worker="worker-test-0",
        delivery_attempt=5 if error_type == ErrorType.MODEL_REJECTED else 1,
        source_message_id=f"src-{cid}",
        source_subscription="comments-scoring",
        ordering_key=ordering_key,
    )
    if parked:
        letter = dataclasses.replace(letter, parked=True)
    # The worker keeps the comment's ordering key as the esp_ordering_key attribute and publishes
    # the dead letter itself without a key.
    data, attrs = letter.to_message()
    return data, attrs, ""


def make_policy_dead_letters(s: PubSubSettings, comments: Sequence[dict[str, str]], attrs: dict[str, str]) -> None:
    """Publishes comments, then nacks every delivery on the worker's subscription until Pub/Sub's
    dead-letter policy has forwarded each of them to the dead-letter topic.

    The emulator forwards a message when it would deliver it once more than max_delivery_attempts,
    so the worker's subscription is pulled (and nacked) until they all show up on the hold one.
    """
    from google.api_core import exceptions as gexc

    publish_raw(s, s.comments_topic, [(json.dumps(c).encode(), attrs, "") for c in comments])
    client = subscriber_client(s)
    worker_sub = s.subscription_path(s.subscription)
    hold_sub = s.subscription_path(s.dead_letter_subscription)
    want = {c["id"] for c in comments}
    forwarded: set[str] = set()
    deadline = time.monotonic() + 60

    def pull_and_nack(path: str) -> list[Any]:
        try:
            resp = client.pull(request={"subscription": path, "max_messages": 100}, timeout=0.3, retry=None)
        except gexc.DeadlineExceeded:
            return []
        if resp.received_messages:
            client.modify_ack_deadline(
                request={"subscription": path, "ack_ids": [m.ack_id for m in resp.received_messages], "ack_deadline_seconds": 0}
            )
        return list(resp.received_messages)

    try:
        while not want <= forwarded:
            assert time.monotonic() < deadline, f"the policy forwarded only {sorted(forwarded)} of {sorted(want)} in 60 s"
            pull_and_nack(worker_sub)
            for m in pull_and_nack(hold_sub):
                if POLICY_DELIVERY_COUNT in m.message.attributes:
                    forwarded.add(json.loads(m.message.data)["id"])
    finally:
        client.close()


def drain(s: PubSubSettings, subscription: str, *, idle_s: float = 1.0, timeout_s: float = 60) -> list[Any]:
    """Acks and returns everything on `subscription` until it has been empty for `idle_s`."""
    from google.api_core import exceptions as gexc

    client = subscriber_client(s)
    path = s.subscription_path(subscription)
    got: list[Any] = []
    last = time.monotonic()
    deadline = last + timeout_s
    try:
        while time.monotonic() - last < idle_s and time.monotonic() < deadline:
            try:
                # Short deadline: the emulator holds an empty pull open for seconds otherwise.
                resp = client.pull(request={"subscription": path, "max_messages": 1000}, timeout=0.3, retry=None)
            except gexc.DeadlineExceeded:
                continue
            if resp.received_messages:
                got.extend(resp.received_messages)
                client.acknowledge(request={"subscription": path, "ack_ids": [m.ack_id for m in resp.received_messages]})
                last = time.monotonic()
    finally:
        client.close()
    return got


def held(s: PubSubSettings) -> list[Letter]:
    """Every dead letter now on the hold subscription (read without consuming)."""
    return peek(s, FAST, Filter(), max_messages=None).items


def comment_ids(letters: Sequence[Letter]) -> collections.Counter:
    return collections.Counter(x.comment_id or x.message_id for x in letters)


def fresh(emulator: Any, **overrides: Any) -> PubSubSettings:
    s = unique_settings(emulator, **overrides)
    init_resources(s)
    # A tap on the comments topic: every replayed message lands here for the test to read.
    create_subscription(s, s.comments_topic, "tap-" + s.subscription)
    return s


# ---------------------------------------------------------------------------------------------
# A shared, read-only population: looking at it must change nothing.

REJECTED = ["rej-1", "rej-2"]
POLICY = ["pol-1", "pol-2"]
# A producer's attempt to pass for ESP: hide its comment from replay, forge a reason.
FORGED = {"source": "app-f", ATTR_PARKED: "true", "esp_error_type": "invalid_json", "esp_reason": "forged", ATTR_REPLAY_COUNT: "2"}


@pytest.fixture(scope="module")
def policy_made(emulator: Any) -> dict[str, PubSubSettings]:
    """Fresh sets of resources with policy-forwarded dead letters: "population" (pol-1, pol-2),
    "replay" (p-1) and "forged" (f-1, whose producer set esp_* attributes of its own). The
    emulator takes ~8 s to forward, so all are made at once."""
    from concurrent.futures import ThreadPoolExecutor

    made = {"population": fresh(emulator), "replay": fresh(emulator), "forged": fresh(emulator)}
    jobs = {
        "population": ([{"id": c, "text": f"text of {c}"} for c in POLICY], {"source": "app-c"}),
        "replay": ([{"id": "p-1", "text": "hello"}], {"source": "app-z"}),
        "forged": ([{"id": "f-1", "text": "hi"}], FORGED),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(make_policy_dead_letters, made[k], *jobs[k]) for k in made]:
            f.result()
    for s in made.values():
        drain(s, "tap-" + s.subscription, idle_s=0.3)  # the policy's comments also passed the tap
    return made


@pytest.fixture(scope="module")
def population(policy_made: dict[str, PubSubSettings]) -> Iterator[tuple[PubSubSettings, dict[str, str]]]:
    """7 worker dead letters (3 invalid JSON, 1 invalid UTF-8, 2 rejected by the model, 1 parked)
    and 2 forwarded by the policy. Returns the settings and each comment id's message id."""
    s = policy_made["population"]
    letters = [
        worker_dead_letter(None, body=b"not json {", stage=Stage.VALIDATE, error_type=ErrorType.INVALID_JSON,
                           reason="body is not JSON: Expecting value at line 1 column 1"),
        worker_dead_letter(None, body=b'{"id": "bad-1", "text":', stage=Stage.VALIDATE, error_type=ErrorType.INVALID_JSON,
                           reason="body is not JSON: Expecting value at line 1 column 24"),
        worker_dead_letter(None, body=b"[1, 2]", stage=Stage.VALIDATE, error_type=ErrorType.INVALID_JSON,
                           reason="body is not JSON: something else"),
        worker_dead_letter(None, body=b"\xff\xfe binary", stage=Stage.VALIDATE, error_type=ErrorType.INVALID_UTF8,
                           reason="body is not valid UTF-8 at byte 0"),
        worker_dead_letter("rej-1", attributes={"source": "app-a"}, ordering_key="user-7"),
        worker_dead_letter("rej-2", attributes={"source": "app-b"}),
        worker_dead_letter("parked-1", replay_count=3, parked=True),
    ]  # fmt: skip
    ids = publish_raw(s, s.dead_letter_topic, letters)
    # Names for the bodies that carry no comment id, in the order of their reasons.
    by_id = {"msg:0": ids[0], "msg:1": ids[1], "msg:2": ids[2], "binary": ids[3], "rej-1": ids[4], "rej-2": ids[5]}
    by_id["parked-1"] = ids[6]
    yield s, by_id


def _listed(result: click.testing.Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_stats_counts_both_kinds_with_reasons_and_consumes_nothing(population: Any) -> None:
    s, _ = population
    result = run_cli("stats", s, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["total"] == 9
    assert stats["by_kind"] == {KIND_WORKER: 7, KIND_POLICY: 2}
    assert stats["parked"] == 1
    groups = {(g["kind"], g["stage"], g["error_type"]): g for g in stats["groups"]}
    assert groups[(KIND_WORKER, Stage.VALIDATE, ErrorType.INVALID_JSON)]["count"] == 3
    assert groups[(KIND_WORKER, Stage.VALIDATE, ErrorType.INVALID_JSON)]["distinct_reasons"] == 3
    assert groups[(KIND_WORKER, Stage.SCORE, ErrorType.MODEL_REJECTED)]["count"] == 3  # 2 + the parked one
    assert groups[(KIND_WORKER, Stage.VALIDATE, ErrorType.INVALID_UTF8)]["reasons"] == {"body is not valid UTF-8 at byte 0": 1}
    policy = groups[(KIND_POLICY, "unknown", "max_delivery_attempts")]
    assert policy["count"] == 2 and policy["reasons"] == {POLICY_REASON: 2}
    assert stats["oldest"] <= stats["newest"]
    assert "nothing consumed" in result.stderr
    # Looking took nothing: the table view counts the same nine, grouped the same way.
    table = run_cli("stats", s)
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0].startswith("9 dead letter(s) (2 policy, 7 worker; 1 parked)")
    assert POLICY_REASON in table.stdout


def test_list_shows_reason_attempts_and_kind_for_both_kinds(population: Any) -> None:
    s, by_id = population
    rows = _listed(run_cli("list", s, "--json"))
    assert len(rows) == 9
    by_comment = {r["comment_id"]: r for r in rows if r["comment_id"]}
    for cid in POLICY:
        row = by_comment[cid]
        assert (row["kind"], row["reason"], row["delivery_attempts"]) == (KIND_POLICY, POLICY_REASON, 5)
        assert row["source_subscription"] == s.subscription
    rej = by_comment["rej-1"]
    assert (rej["kind"], rej["stage"], rej["error_type"]) == (KIND_WORKER, Stage.SCORE, ErrorType.MODEL_REJECTED)
    assert rej["reason"].startswith("model rejected") and rej["delivery_attempts"] == 5
    assert rej["message_id"] == by_id["rej-1"] and rej["age_s"] >= 0
    assert by_comment["parked-1"]["parked"] is True and by_comment["parked-1"]["replay_count"] == 3
    # Ages come out oldest first.
    assert [r["dead_lettered_at"] for r in rows] == sorted(r["dead_lettered_at"] for r in rows)
    table = run_cli("list", s)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["AGE", "KIND", "STAGE"] and len(lines) == 10
    assert sum(POLICY_REASON in line for line in lines) == 2
    assert "9 dead letter(s) match" in table.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--stage", "score"], {"rej-1", "rej-2", "parked-1"}),
        (["--stage", "score", "--parked", "exclude"], {"rej-1", "rej-2"}),
        (["--parked", "only"], {"parked-1"}),
        (["--error-type", "invalid_json"], {"msg:0", "msg:1", "msg:2"}),
        (["--error-type", "invalid_json", "--error-type", "invalid_utf8"], {"msg:0", "msg:1", "msg:2", "binary"}),
        (["--reason", "COLUMN 24"], {"msg:1"}),
        (["--kind", "policy"], set(POLICY)),
        (["--id", "rej-2", "--id", "pol-1"], {"rej-2", "pol-1"}),
        (["--id", "MSGID:binary"], {"binary"}),
        (["--id", "src-rej-1"], {"rej-1"}),
        (["--since", "1h", "--kind", "policy"], set(POLICY)),
        (["--since", "2099-01-01T00:00:00Z"], set()),
        (["--until", "2000-01-01"], set()),
        (["--stage", "validate", "--kind", "policy"], set()),
    ],
)
def test_filters_select_exactly_the_matching_records(population: Any, args: list[str], expected: set[str]) -> None:
    s, by_id = population
    args = [a.replace("MSGID:binary", by_id["binary"]) for a in args]
    rows = _listed(run_cli("list", s, "--json", *args))
    names = {mid: name for name, mid in by_id.items()}
    got = {r["comment_id"] or names[r["message_id"]] for r in rows}
    assert got == expected


def test_ids_file_and_time_window(population: Any, tmp_path: Path) -> None:
    s, _ = population
    ids = tmp_path / "ids.txt"
    ids.write_text("# from the incident ticket\nrej-1\n\npol-2\nnot-a-dead-letter\n")
    rows = _listed(run_cli("list", s, "--json", "--ids-file", str(ids)))
    assert {r["comment_id"] for r in rows} == {"rej-1", "pol-2"}
    everything = _listed(run_cli("list", s, "--json"))
    newest = max(r["dead_lettered_at"] for r in everything)
    rows = _listed(run_cli("list", s, "--json", "--since", newest))
    assert rows and all(r["dead_lettered_at"] == newest for r in rows)


def test_show_prints_body_and_attributes_and_fails_on_unknown_ids(population: Any) -> None:
    s, by_id = population
    result = run_cli("show", s, "pol-1", by_id["binary"])
    assert result.exit_code == 0, result.output
    assert "forwarded by policy, no reason recorded" in result.stdout
    assert POLICY_DELIVERY_COUNT in result.stdout  # the policy's own attributes are shown as they are
    assert "(9 bytes, base64)" in result.stdout
    records = json.loads(run_cli("show", s, "--json", "rej-1").stdout)
    assert len(records) == 1 and records[0]["ordering_key"] == "user-7"
    assert records[0]["attributes"]["source"] == "app-a"
    missing = run_cli("show", s, "rej-1", "no-such-id")
    assert missing.exit_code == 1
    assert "not found: no-such-id" in missing.stderr


def test_dry_run_and_purge_without_yes_change_nothing(population: Any) -> None:
    s, _ = population
    before = comment_ids(held(s))
    dry = run_cli("replay", s, "--dry-run", "--include-parked")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("dry run: 9 of 9 dead letter(s) match; would replay 9")
    dry = run_cli("replay", s, "--dry-run", "--max-replays", "0")
    assert "would replay 0" in dry.stdout and "park 8" in dry.stdout  # the parked one is skipped
    refused = run_cli("purge", s)
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "--yes" in refused.stderr
    dry_purge = run_cli("purge", s, "--dry-run", "--kind", "policy")
    assert dry_purge.exit_code == 0 and "would purge 2" in dry_purge.stdout
    assert comment_ids(held(s)) == before
    assert drain(s, "tap-" + s.subscription, idle_s=0.5) == []  # nothing was republished


def test_export_writes_every_record_round_trip_and_consumes_nothing(population: Any, tmp_path: Path) -> None:
    s, by_id = population
    out = tmp_path / "dead.jsonl"
    result = run_cli("export", s, str(out))
    assert result.exit_code == 0, result.output
    assert "exported 9 dead letter(s)" in result.stdout and "nothing consumed" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 9
    by_mid = {r["message_id"]: r for r in records}
    assert record_data(by_mid[by_id["binary"]]) == b"\xff\xfe binary"
    assert by_mid[by_id["binary"]]["data_encoding"] == "base64"
    assert json.loads(record_data(by_mid[by_id["rej-1"]]))["id"] == "rej-1"
    assert {r["classification"]["kind"] for r in records} == {KIND_WORKER, KIND_POLICY}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(held(s)) == 9
    again = run_cli("export", s, str(out))
    assert again.exit_code == 1 and "exists" in again.stderr
    assert run_cli("export", s, str(out), "--force", "--kind", "policy").exit_code == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["list", "--since", "yesterday"], "neither an ISO-8601 time nor an age"),
        (["list", "--since", "1h", "--until", "2h"], "is after --until"),
        (["list", "--parked", "maybe"], "'maybe' is not one of"),
        (["replay", "--rate", "0"], "--rate"),
        (["replay", "--max-replays", "-1"], "max_replays must be between 0 and 999"),
        (["replay", "--max-replays", "1000"], "max_replays must be between 0 and 999"),
        (["stats", "--dead-letter-lease-s", "5"], "between 10 and 600"),
        (["list", "--ids-file", "/no/such/file"], "does not exist"),
        (["show"], "Missing argument"),
    ],
)
def test_bad_arguments_give_one_line_and_non_zero(args: list[str], message: str) -> None:
    result = click.testing.CliRunner().invoke(cli, ["dead-letters", *args], catch_exceptions=False)
    assert result.exit_code != 0
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_unreachable_emulator_is_one_line() -> None:
    from esp.localstack import free_port

    result = click.testing.CliRunner().invoke(
        cli, ["dead-letters", "stats", "--emulator-host", f"127.0.0.1:{free_port()}"], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert "cannot reach the Pub/Sub emulator" in result.stderr and result.stderr.count("\n") == 1


def test_missing_subscription_says_run_init(emulator: Any) -> None:
    s = unique_settings(emulator)  # never initialised
    result = run_cli("list", s)
    assert result.exit_code == 1
    assert "esp pubsub init" in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Changing things


def test_replay_keeps_body_attributes_and_ordering_key_and_parks_past_max_replays(emulator: Any) -> None:
    s = fresh(emulator)
    publish_raw(
        s,
        s.dead_letter_topic,
        [
            worker_dead_letter("r-1", attributes={"source": "app-a", "lang": "en"}, ordering_key="user-1"),
            worker_dead_letter("r-2", replay_count=1),
            worker_dead_letter("r-3", replay_count=2),  # its next replay would be the 3rd > 2: parked
            worker_dead_letter(None, body=b"nope", stage=Stage.VALIDATE, error_type=ErrorType.INVALID_JSON, reason="bad"),
        ],
    )
    result = run_cli("replay", s, "--stage", "score", "--max-replays", "2")
    assert result.exit_code == 0, result.output
    assert "replayed 2" in result.stdout and "parked 1" in result.stdout and "1 not matching" in result.stdout
    replayed = {json.loads(m.message.data)["id"]: m.message for m in drain(s, "tap-" + s.subscription)}
    assert set(replayed) == {"r-1", "r-2"}
    assert dict(replayed["r-1"].attributes) == {"source": "app-a", "lang": "en", ATTR_REPLAY_COUNT: "1"}
    assert replayed["r-1"].ordering_key == "user-1"
    assert dict(replayed["r-2"].attributes) == {ATTR_REPLAY_COUNT: "2"}
    assert replayed["r-2"].data == json.dumps({"id": "r-2", "text": "text of r-2"}).encode()

    # Left: the untouched invalid one and r-3's parked copy, which still reads as what it was.
    left = {x.comment_id or "invalid": x.dead_letter for x in held(s)}
    assert set(left) == {"invalid", "r-3"}
    assert left["r-3"].parked and left["r-3"].replay_count == 2 and left["r-3"].error_type == ErrorType.MODEL_REJECTED
    assert not left["invalid"].parked

    # A second replay skips the parked one; --include-parked sends it anyway, counting on.
    again = run_cli("replay", s, "--stage", "score")
    assert "replayed 0" in again.stdout and "1 parked skipped" in again.stdout
    forced = run_cli("replay", s, "--stage", "score", "--include-parked", "--max-replays", "2")
    assert forced.exit_code == 0 and "replayed 1" in forced.stdout
    [msg] = drain(s, "tap-" + s.subscription)
    assert json.loads(msg.message.data)["id"] == "r-3" and msg.message.attributes[ATTR_REPLAY_COUNT] == "3"
    assert ATTR_PARKED not in msg.message.attributes
    assert [x.dead_letter.error_type for x in held(s)] == [ErrorType.INVALID_JSON]


def test_policy_forwarded_dead_letters_replay_without_policy_attributes(policy_made: dict[str, PubSubSettings]) -> None:
    s = policy_made["replay"]
    [letter] = held(s)
    assert letter.attributes[POLICY_DELIVERY_COUNT] == "5"
    result = run_cli("replay", s, "--kind", "policy", "--to", s.comments_topic)
    assert result.exit_code == 0 and "replayed 1" in result.stdout
    [msg] = drain(s, "tap-" + s.subscription)
    assert dict(msg.message.attributes) == {"source": "app-z", ATTR_REPLAY_COUNT: "1"}
    assert held(s) == []


def test_a_producers_esp_attributes_cannot_hide_a_policy_letter_and_parking_it_is_believed(
    policy_made: dict[str, PubSubSettings],
) -> None:
    s = policy_made["forged"]
    [row] = _listed(run_cli("list", s, "--json"))
    # Forwarded by the policy: the comment's esp_* attributes are its own, not a verdict. Its
    # esp_replay_count is a valid count, so it is read (forging it only brings parking forward).
    assert (row["kind"], row["reason"], row["parked"], row["replay_count"]) == (KIND_POLICY, POLICY_REASON, False, 2)
    # Its next replay would be the 3rd > 2: it is parked, in ESP's own form, and believed parked.
    parked = run_cli("replay", s, "--max-replays", "2")
    assert parked.exit_code == 0 and "parked 1" in parked.stdout, parked.output
    [letter] = held(s)
    d = letter.dead_letter
    assert (d.kind, d.parked, d.replay_count, d.reason) == (KIND_POLICY, True, 2, POLICY_REASON)
    assert letter.attributes["esp_kind"] == KIND_POLICY and not any(k.startswith("CloudPubSub") for k in letter.attributes)
    own = {k: v for k, v in FORGED.items() if k != ATTR_REPLAY_COUNT}
    assert d.attributes == own
    assert "1 parked skipped" in run_cli("replay", s).stdout
    # Replayed on purpose, it is exactly what the producer sent, counted on.
    forced = run_cli("replay", s, "--include-parked")
    assert forced.exit_code == 0 and "replayed 1" in forced.stdout
    [msg] = drain(s, "tap-" + s.subscription)
    assert dict(msg.message.attributes) == {**own, ATTR_REPLAY_COUNT: "3"}
    assert held(s) == []


def test_purge_yes_discards_only_the_matching(emulator: Any) -> None:
    s = fresh(emulator)
    mangled = (b"?", {"esp_error_type": "model_rejected", "esp_delivery_attempt": "five"}, "")
    publish_raw(
        s,
        s.dead_letter_topic,
        [worker_dead_letter(f"k-{i}") for i in range(3)]
        + [worker_dead_letter(None, body=b"x", stage=Stage.VALIDATE, error_type=ErrorType.INVALID_JSON, reason="bad")] * 2
        + [mangled],
    )
    # A message whose esp_* attributes do not parse is still listed (and purgeable), not fatal.
    [odd] = _listed(run_cli("list", s, "--json", "--error-type", UNREADABLE))
    assert "could not be read" in odd["reason"]
    assert run_cli("purge", s, "--yes", "--error-type", UNREADABLE).stdout.startswith("purged 1 ")
    result = run_cli("purge", s, "--yes", "--error-type", "invalid_json")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("purged 2 dead letter(s)")
    assert comment_ids(held(s)) == collections.Counter({"k-0": 1, "k-1": 1, "k-2": 1})
    limited = run_cli("purge", s, "--yes", "--limit", "1")
    assert "purged 1" in limited.stdout and len(held(s)) == 2


def test_export_consume_acks_only_what_was_written(emulator: Any, tmp_path: Path) -> None:
    s = fresh(emulator)
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter(f"e-{i}", attributes={"n": str(i)}) for i in range(4)])
    out = tmp_path / "out.jsonl"
    result = run_cli("export", s, str(out), "--consume", "--id", "e-0", "--id", "e-3")
    assert result.exit_code == 0, result.output
    assert "consumed 2" in result.stdout
    assert sorted(json.loads(line)["attributes"]["n"] for line in out.read_text().splitlines()) == ["0", "3"]
    assert set(comment_ids(held(s))) == {"e-1", "e-2"}


SET_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.Handlers(int(sys.argv[1]))); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def start_replay_and_interrupt(
    s: PubSubSettings, sig: int, *, after: int, args: Sequence[str], sigint: Any = signal.SIG_DFL, times: int = 1
) -> tuple[list[Any], str]:
    """Runs `esp dead-letters replay` as a process, sends it `sig` once `after` replayed messages
    reached the tap, and returns what the tap received until then and the process's output."""
    tap = s.subscription_path("tap-" + s.subscription)
    # SIGINT as `sigint` in the replay (by default as in a terminal), whatever this suite inherited:
    # started in the background by a shell without job control (`make test &` in a script), it
    # has SIGINT ignored, and so would the replay. A launcher sets it and execs the replay, since
    # Popen's preexec_fn would fork this process, whose gRPC threads may hold locks the child then
    # waits on for ever (Python's subprocess docs: not safe in the presence of threads).
    argv = [sys.executable, "-c", SET_SIGINT_THEN_EXEC, str(int(sigint)),
            sys.executable, "-m", "esp.cli.main", "dead-letters", "replay", *settings_args(s), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESP_") and k != "PUBSUB_EMULATOR_HOST"}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    received: list[Any] = []
    client = subscriber_client(s)
    try:
        deadline = time.monotonic() + 60
        while len(received) < after:
            assert proc.poll() is None, f"replay finished before it could be interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, f"only {len(received)} replayed within 60 s"
            resp = client.pull(request={"subscription": tap, "max_messages": 100}, timeout=5)
            if resp.received_messages:
                received.extend(resp.received_messages)
                client.acknowledge(request={"subscription": tap, "ack_ids": [m.ack_id for m in resp.received_messages]})
        for i in range(times):  # spread over a second
            if i:
                time.sleep(1.0 / times)
            os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=30)
    finally:
        client.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return received, f"exit {proc.returncode}: {output.strip()}"


def test_replay_killed_half_way_then_rerun_loses_nothing(emulator: Any) -> None:
    """SIGKILL a paced replay after some messages went out, run it again: every dead letter is
    replayed or parked, none is left, and duplicates stay within the in-flight window."""
    s = fresh(emulator)
    # Paced so that the kill lands with seconds of work left, even on a loaded machine.
    n_replay, n_park, rate = 50, 10, 10.0
    letters = [worker_dead_letter(f"kill-{i:03d}", attributes={"i": str(i)}) for i in range(n_replay)]
    letters += [worker_dead_letter(f"park-{i:03d}", replay_count=2) for i in range(n_park)]
    publish_raw(s, s.dead_letter_topic, letters)
    received, _ = start_replay_and_interrupt(s, signal.SIGKILL, after=25, args=["--max-replays", "2", "--rate", str(rate)])
    first_run = len(received)
    # The killed run's leases lapse within dead_letter_lease_s: scan at least that long.
    rerun = run_cli("replay", s, "--max-replays", "2", "--min-scan-s", "11")
    assert rerun.exit_code == 0, rerun.output
    received += drain(s, "tap-" + s.subscription)

    replays = collections.Counter(json.loads(m.message.data)["id"] for m in received)
    parked = comment_ids(held(s))
    want_replayed = {f"kill-{i:03d}" for i in range(n_replay)}
    want_parked = {f"park-{i:03d}" for i in range(n_park)}
    assert set(replays) == want_replayed, f"never replayed: {sorted(want_replayed - set(replays))}"
    assert set(parked) == want_parked, f"left on the hold subscription: {sorted(set(parked) - want_parked)}"
    assert all(x.dead_letter.parked for x in held(s))
    assert all(m.message.attributes[ATTR_REPLAY_COUNT] == "1" for m in received)
    duplicates = sum(replays.values()) - len(replays) + sum(parked.values()) - len(parked)
    window = in_flight_window(FAST.replay_window, rate)
    print(
        f"\nSIGKILL: {first_run} replayed before the kill, {len(received)} replays in all for {n_replay} dead letters; "
        f"{n_park} parked; duplicates {duplicates} (window {window}); rerun: {rerun.stdout.strip()}"
    )
    assert duplicates <= window


def test_replay_interrupted_with_ctrl_c_settles_what_it_sent(emulator: Any) -> None:
    """SIGINT: the replay acks what it already republished, hands the rest back at once and says
    so; an immediate re-run (no lease to wait for) finishes the job with no duplicate."""
    s = fresh(emulator)
    # Paced so that the signal lands with about ten seconds of work left, not three (40 letters at
    # 10/s): on a loaded machine the tap may see the first ten late. It failed once under load.
    n = 60
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter(f"int-{i:03d}") for i in range(n)])
    received, output = start_replay_and_interrupt(s, signal.SIGINT, after=10, args=["--rate", "5"])
    assert output.startswith("exit 130:") and "INTERRUPTED" in output, output
    rerun = run_cli("replay", s)
    assert rerun.exit_code == 0, rerun.output
    received += drain(s, "tap-" + s.subscription)
    replays = collections.Counter(json.loads(m.message.data)["id"] for m in received)
    assert set(replays) == {f"int-{i:03d}" for i in range(n)}
    assert held(s) == []
    print(f"\nSIGINT: {output}; rerun: {rerun.stdout.strip()}; duplicates {sum(replays.values()) - n}")
    assert sum(replays.values()) == n


def test_replay_started_with_sigint_ignored_keeps_ignoring_it(emulator: Any) -> None:
    """A replay started with SIGINT ignored (a background job) is not interrupted by it, wherever
    the signal lands: it used to catch SIGINT inside each publish block only, so it stopped or
    not by chance. Twenty signals over a second, so that some may land inside a publish."""
    s = fresh(emulator)
    n = 30
    publish_raw(s, s.dead_letter_topic, [worker_dead_letter(f"ign-{i:03d}") for i in range(n)])
    received, output = start_replay_and_interrupt(s, signal.SIGINT, after=5, args=["--rate", "10"], sigint=signal.SIG_IGN, times=20)
    assert output.startswith("exit 0:") and f"replayed {n} " in output, output
    received += drain(s, "tap-" + s.subscription)
    assert collections.Counter(json.loads(m.message.data)["id"] for m in received) == {f"ign-{i:03d}": 1 for i in range(n)}


# ---------------------------------------------------------------------------------------------
# The small pure pieces


def test_parse_when_reads_iso_times_and_ages() -> None:
    import datetime as dt

    from esp.dead_letters import parse_when

    now = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_when("90m", now) == now - dt.timedelta(minutes=90)
    assert parse_when("1.5h", now) == now - dt.timedelta(minutes=90)
    assert parse_when("2d", now) == now - dt.timedelta(days=2)
    assert parse_when("2024-05-01T10:00:00Z") == dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone.utc)
    assert parse_when("2024-05-01T10:00") == dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone.utc)  # naive is UTC
    assert parse_when("2024-05-01T12:00+02:00") == dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="neither"):
        parse_when("2 hours")


def test_rate_limiter_paces_without_bursting_after_a_pause() -> None:
    from esp.dead_letters import RateLimiter

    t = [0.0]
    slept: list[float] = []

    def sleep(d: float) -> None:
        slept.append(round(d, 6))
        t[0] += d

    limiter = RateLimiter(4.0, clock=lambda: t[0], sleep=sleep)
    for _ in range(5):
        limiter.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25] and t[0] == 1.0
    t[0] += 10.0  # a long pause is not banked as credit
    slept.clear()
    for _ in range(3):
        limiter.wait()
    assert slept == [0.25, 0.25]
    assert in_flight_window(100, 4.0) == 4 and in_flight_window(100, 0.5) == 1 and in_flight_window(100, None) == 100


def test_export_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    from esp.dead_letters import atomic_jsonl

    path = tmp_path / "dead.jsonl"
    with atomic_jsonl(path) as f:
        f.write('{"a": 1}\n{"b": "ü"}\n')
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "ü"}\n'

    with pytest.raises(RuntimeError), atomic_jsonl(path) as f:
        f.write('{"c": 3}\n')
        raise RuntimeError("disk on fire")
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "ü"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["dead.jsonl"]
