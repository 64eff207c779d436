"""The micro-batcher and the lease ledger, driven with injected time (no services, no sleeps)."""

from __future__ import annotations

import random

import pytest

from worker.batcher import MicroBatcher
from worker.leases import Ledger


def fifo(size: int = 4, latency_s: float = 0.05) -> MicroBatcher[str]:
    return MicroBatcher(max_batch_size=size, max_latency_s=latency_s)


def test_full_batch_is_released_at_once_and_in_arrival_order() -> None:
    b = fifo()
    for i, item in enumerate("abcde"):
        b.add(item, now=i * 0.001)
    assert b.pop(now=0.004) == ["a", "b", "c", "d"]
    assert b.pop(now=0.004) is None  # "e" alone is not due yet
    assert len(b) == 1


def test_partial_batch_waits_exactly_max_latency_of_its_oldest_item() -> None:
    b = fifo(latency_s=0.05)
    b.add("a", now=10.0)
    b.add("b", now=10.03)
    assert b.due_at() == pytest.approx(10.05)
    assert b.pop(now=10.0499) is None
    assert b.pop(now=10.05) == ["a", "b"]
    assert b.due_at() is None


def test_zero_latency_releases_whatever_is_there() -> None:
    b = fifo(latency_s=0.0)
    b.add("a", now=1.0)
    assert b.pop(now=1.0) == ["a"]


def test_flush_and_drain() -> None:
    b = fifo()
    b.add("a", now=0.0)
    assert b.pop(now=0.0, flush=True) == ["a"]
    b.add("b", now=0.0)
    b.add("c", now=0.0)
    assert b.drain() == ["b", "c"]
    assert len(b) == 0 and b.pop(now=99.0) is None


@pytest.mark.parametrize("kwargs", [dict(max_batch_size=0, max_latency_s=0.1), dict(max_batch_size=4, max_latency_s=-1)])
def test_configuration_is_checked_up_front(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(**kwargs)


def grouped(size: int = 4) -> MicroBatcher[str]:
    return MicroBatcher(max_batch_size=size, max_latency_s=0.05, length_grouping=True, length=len)


def test_length_grouping_batches_similar_lengths_around_the_oldest() -> None:
    b = grouped(size=3)
    # Oldest is a 5-character text; the two other 5-ish texts join it, the long ones wait.
    for t, text in enumerate(["aaaaa", "x" * 100, "bbbbbb", "y" * 101, "cccc", "z" * 99]):
        b.add(text, now=t * 0.001)
    assert sorted(b.pop(now=0.01) or []) == sorted(["aaaaa", "bbbbbb", "cccc"])
    assert sorted(b.pop(now=0.01) or []) == sorted(["x" * 100, "y" * 101, "z" * 99])


def test_length_grouping_always_includes_the_oldest_so_nothing_starves() -> None:
    rng = random.Random(7)
    b = grouped(size=8)
    order = []
    for i in range(400):
        text = "w" * rng.randint(1, 500)
        item = f"{i:04d}{text}"
        order.append(item)
        b.add(item, now=float(i))
    released = []
    while len(b):
        oldest_waiting = next(x for x in order if x not in released)
        batch = b.pop(now=1e9)
        assert batch is not None and len(batch) <= 8
        assert oldest_waiting in batch
        released.extend(batch)
    assert sorted(released) == sorted(order)


def test_length_grouping_reduces_padding_on_a_backlog() -> None:
    rng = random.Random(3)
    texts = ["v" * int(rng.lognormvariate(5, 1)) + str(i) for i in range(2000)]

    def padded_cells(batcher: MicroBatcher[str]) -> int:
        for i, t in enumerate(texts):
            batcher.add(t, now=float(i))
        cells = 0
        while len(batcher):
            batch = batcher.pop(now=1e9)
            assert batch is not None
            cells += max(map(len, batch)) * len(batch)
        return cells

    plain = padded_cells(MicroBatcher(max_batch_size=32, max_latency_s=0.05))
    grouped_cells = padded_cells(MicroBatcher(max_batch_size=32, max_latency_s=0.05, length_grouping=True, length=len))
    # Padding shrinks a lot on a long-tailed length distribution like real comments.
    assert grouped_cells < 0.6 * plain


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


def test_a_message_is_settled_exactly_once() -> None:
    led = ledger()
    led.hold("a", 1, now=0.0, lease_s=10)
    assert led.settle("a") is True
    assert led.settle("a") is False
    assert led.count == 0 and led.bytes == 0


def test_short_lease_is_extended_half_way_then_at_the_margin() -> None:
    led = ledger()
    led.hold("a", 1, now=100.0, lease_s=8)  # an 8 s ack deadline: half of it (4 s) is less than the 5 s margin
    assert led.due_for_extension(now=103.9) == []
    assert led.due_for_extension(now=104.0) == ["a"]
    assert led.due_for_extension(now=104.1) == []  # now extended to 164
    assert led.due_for_extension(now=158.9) == []
    assert led.due_for_extension(now=159.0) == ["a"]  # the 5 s margin before 164


def test_tiny_lease_uses_half_its_length_as_margin() -> None:
    led = ledger(margin_s=20, extension_s=60)
    led.hold("a", 1, now=0.0, lease_s=10)
    assert led.due_for_extension(now=4.9) == []
    assert led.due_for_extension(now=5.0) == ["a"]


def test_leases_stop_being_extended_after_max_lease_duration() -> None:
    led = ledger(max_lease_duration_s=100)
    led.hold("a", 1, now=0.0, lease_s=10)
    assert led.due_for_extension(now=5.0) == ["a"]
    assert led.due_for_extension(now=99.0) == ["a"]
    assert led.due_for_extension(now=200.0) == []
    assert led.holds("a")  # still counted until settled


def test_settled_messages_are_not_extended() -> None:
    led = ledger()
    led.hold("a", 1, now=0.0, lease_s=10)
    led.hold("b", 1, now=0.0, lease_s=10)
    led.settle("a")
    assert led.due_for_extension(now=6.0) == ["b"]
