"""The worker's ledger: flow control and leases, with injected time."""

from __future__ import annotations

from worker.leases import Ledger


# ---------------------------------------------------------------------------------------------
# The ledger: flow control and leases


def ledger(**kw: float) -> Ledger:
    values = dict(max_messages=3, max_bytes=1000, extension_s=60, margin_s=5, max_lease_duration_s=3600)
    values.update(kw)
    return Ledger(**values)  # type: ignore[arg-type]


def test_room_is_bounded_by_messages_and_bytes() -> None:
    led = ledger()
    assert led.room() == 3
    led.hold("a", 10, now=0.0, lease_s=10)
    assert led.room() == 2
    led.hold("b", 995, now=0.0, lease_s=10)
    assert led.room() == 0  # bytes bound reached although one message slot is free
    assert led.settle("b")
    assert led.room() == 2
    assert led.bytes == 10 and led.count == 1


def test_a_pull_asks_for_no_more_than_fit_in_the_bytes_left_at_the_mean_size() -> None:
    mib = 1024 * 1024
    led = ledger(max_messages=1000, max_bytes=8 * mib)
    assert led.room() == 1000, "nothing seen yet: only the message bound applies"
    led.hold_many([("a", 4 * mib)], now=0.0, lease_s=10)
    assert led.room() == 1, "4 MiB left at 4 MiB a message"
    assert led.settle("a")
    assert led.room() == 2
    led.hold_many([(f"s{i}", 1000) for i in range(10)], now=0.0, lease_s=10)
    assert 2 < led.room() <= 990, "small messages since: the mean comes down, pulls grow again"


def test_a_message_is_settled_exactly_once() -> None:
    led = ledger()
    led.hold("a", 1, now=0.0, lease_s=10)
    assert led.settle("a") is True
    assert led.settle("a") is False
    assert led.count == 0 and led.bytes == 0


def extend_due(led: Ledger, now: float) -> list[str]:
    """What the lease thread does when Pub/Sub confirms every extension."""
    due = led.due_for_extension(now)
    led.extended(due, now)
    return due


def test_short_lease_is_extended_half_way_then_at_the_margin() -> None:
    led = ledger()
    led.hold("a", 1, now=100.0, lease_s=8)  # an 8 s ack deadline: half of it (4 s) is less than the 5 s margin
    assert extend_due(led, now=103.9) == []
    assert extend_due(led, now=104.0) == ["a"]
    assert extend_due(led, now=104.1) == []  # now extended to 164
    assert extend_due(led, now=158.9) == []
    assert extend_due(led, now=159.0) == ["a"]  # the 5 s margin before 164


def test_an_extension_counts_only_once_confirmed_so_a_failed_one_is_retried() -> None:
    led = ledger()
    led.hold("a", 1, now=0.0, lease_s=10)
    assert led.due_for_extension(now=5.0) == ["a"]  # the call fails: nothing recorded
    assert led.due_for_extension(now=6.0) == ["a"]  # still due at the next check, before the lease ends
    assert led.expiring(now=9.9) == 0 and led.expiring(now=10.0) == 1
    led.extended(["a"], now=6.0)
    assert led.due_for_extension(now=7.0) == []
    assert led.expiring(now=10.0) == 0


def test_tiny_lease_uses_half_its_length_as_margin() -> None:
    led = ledger(margin_s=20, extension_s=60)
    led.hold("a", 1, now=0.0, lease_s=10)
    assert extend_due(led, now=4.9) == []
    assert extend_due(led, now=5.0) == ["a"]


def test_leases_stop_being_extended_after_max_lease_duration() -> None:
    led = ledger(max_lease_duration_s=100)
    led.hold("a", 1, now=0.0, lease_s=10)
    assert extend_due(led, now=5.0) == ["a"]
    assert extend_due(led, now=99.0) == ["a"]
    assert extend_due(led, now=200.0) == []
    assert led.holds("a")  # still counted until settled


def test_settled_messages_are_not_extended() -> None:
    led = ledger()
    led.hold("a", 1, now=0.0, lease_s=10)
    led.hold("b", 1, now=0.0, lease_s=10)
    led.settle("a")
    assert extend_due(led, now=6.0) == ["b"]
