"""The micro-batcher shared by the worker and the HTTP API, driven with injected time (no services, no sleeps)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esp.batcher import MicroBatcher, length_sorted_batches


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


@pytest.mark.parametrize("grouping", [False, True])
def test_remove_where_takes_out_exactly_the_matching_items_and_keeps_order(grouping: bool) -> None:
    b: MicroBatcher[str] = MicroBatcher(max_batch_size=3, max_latency_s=0.0, length_grouping=grouping, length=len)
    for i, item in enumerate(["a", "bb", "xc", "ddd", "xe"]):
        b.add(item, now=float(i))
    assert b.remove_where(lambda item: item.startswith("x")) == ["xc", "xe"]
    assert len(b) == 3
    released = []
    while (batch := b.pop(now=10.0)) is not None:
        released.extend(batch)
    assert sorted(released) == ["a", "bb", "ddd"]
    assert b.remove_where(lambda item: True) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5_000), max_size=300), st.integers(min_value=1, max_value=40))
def test_length_sorted_batches_cut_the_whole_set_shortest_first(lengths: list[int], size: int) -> None:
    batches = length_sorted_batches(lengths, size)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    assert all(len(batch) == size for batch in batches[:-1]) and all(0 < len(batch) <= size for batch in batches)
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_length_sorted_batches_refuse_an_empty_batch_size() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        length_sorted_batches([3, 1], 0)
