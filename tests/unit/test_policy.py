"""The batching policy: learned costs, arrival rates, when to hold a partial batch, OOM limits (injected clocks)."""

from __future__ import annotations

import threading

import pytest

from batching import BatchKey, BatchQueue, WorkItem
from batching.policy import MIN_SHARED_ROWS, OOM_COOLDOWN, BatchPolicy

KEY = BatchKey.build("m", "__call__", {"steps": 8})


def trained(policy: BatchPolicy, fixed: float = 0.08, per_item: float = 0.01) -> BatchPolicy:
    for size in (1, 2, 4, 8, 1, 8):
        policy.observe(KEY, size, fixed + per_item * size)
    return policy


def busy(policy: BatchPolicy, gap: float = 0.001, start: float = 0.0, count: int = 20) -> None:
    for i in range(count):
        policy.arrived(KEY, start + i * gap)


def test_cost_line_is_learned_from_observed_calls():
    policy = trained(BatchPolicy(8, 0.05))
    assert policy.estimate(KEY, 1) == pytest.approx(0.09)
    assert policy.estimate(KEY, 8) == pytest.approx(0.16)


def test_no_evidence_means_no_wait():
    policy = BatchPolicy(8, 0.05)
    busy(policy)
    assert policy.wait_until(KEY, queued=1, oldest_arrival=0.0, now=0.0) is None  # costs unknown
    policy.observe(KEY, 1, 0.09)
    assert policy.wait_until(KEY, queued=1, oldest_arrival=0.0, now=0.0) is None  # one size: no line yet


def test_a_lone_request_at_low_load_is_not_held():
    policy = trained(BatchPolicy(8, 0.05))
    busy(policy, gap=1.0, count=3)  # one request a second: nobody expected within 50 ms
    assert policy.wait_until(KEY, queued=1, oldest_arrival=10.0, now=10.0) is None


def test_under_load_a_partial_batch_waits_until_it_should_fill_but_never_past_max_wait():
    policy = trained(BatchPolicy(8, 0.05))
    busy(policy, gap=0.002)  # 500 items/s
    hold = policy.wait_until(KEY, queued=4, oldest_arrival=1.0, now=1.0)
    assert hold == pytest.approx(1.0 + 4 * 0.002)  # 4 more items expected in 8 ms
    policy = trained(BatchPolicy(8, 0.05))
    busy(policy, gap=0.02, start=10)  # 50 items/s: more will come, but 4 more take 80 ms > max_wait
    assert policy.wait_until(KEY, queued=4, oldest_arrival=20.0, now=20.0) == pytest.approx(20.05)
    assert policy.wait_until(KEY, queued=4, oldest_arrival=20.0, now=20.06) is None  # waited long enough
    assert policy.wait_until(KEY, queued=8, oldest_arrival=20.0, now=20.0) is None  # already full


def test_when_batching_gains_nothing_nobody_waits():
    policy = trained(BatchPolicy(8, 0.05), fixed=0.0, per_item=0.05)  # cost grows linearly: no gain
    busy(policy, gap=0.001)
    assert policy.wait_until(KEY, queued=2, oldest_arrival=0.0, now=0.0) is None


def test_out_of_memory_halves_the_limit_for_a_while():
    policy = BatchPolicy(8, 0.0)
    policy.out_of_memory(KEY, 8, now=100.0)
    assert policy.limit(KEY, 100.0) == 4
    assert policy.limit(KEY, 100.0 + OOM_COOLDOWN + 1) == 8


def test_queue_dispatches_a_lone_item_without_waiting_for_max_wait():
    """A frozen clock and an hour of max_wait: a held item would make a non-blocking take come back empty."""
    frozen = lambda: 5.0  # noqa: E731
    policy = trained(BatchPolicy(8, max_wait=3600.0))
    queue = BatchQueue(16, clock=frozen, policy=policy)
    queue.put([WorkItem(KEY, {"prompt": "alone"}, seed=0)])  # first arrival: no rate known
    taken = queue.take(lambda key: 8, block=False)
    assert taken is not None and len(taken.items) == 1


def test_queue_holds_a_partial_batch_under_load_and_releases_it_when_full():
    now = [0.0]
    policy = trained(BatchPolicy(4, max_wait=3600.0))
    queue = BatchQueue(16, clock=lambda: now[0], policy=policy)
    for i in range(10):  # a steady stream teaches the policy the arrival rate
        now[0] = i * 0.001
        policy.arrived(KEY, now[0])
    queue.put([WorkItem(KEY, {"prompt": "a"}, seed=0)])
    assert queue.take(lambda key: 4, block=False) is None  # held: more items are expected at once
    queue.put([WorkItem(KEY, {"prompt": p}, seed=0) for p in "bcd"])  # the batch fills: released
    taken = queue.take(lambda key: 4, block=False)
    assert [i.inputs["prompt"] for i in taken.items] == ["a", "b", "c", "d"]


def test_a_blocked_take_wakes_when_the_held_batch_fills():
    now = [0.0]
    policy = trained(BatchPolicy(2, max_wait=3600.0))
    queue = BatchQueue(16, clock=lambda: now[0], policy=policy)
    for i in range(10):
        now[0] = i * 0.001
        policy.arrived(KEY, now[0])
    queue.put([WorkItem(KEY, {"prompt": "a"}, seed=0)])
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take(lambda key: 2)))
    worker.start()
    queue.put([WorkItem(KEY, {"prompt": "b"}, seed=0)])  # wakes the waiting worker: now full
    worker.join(timeout=10)
    assert not worker.is_alive() and [i.inputs["prompt"] for i in taken[0].items] == ["a", "b"]


def test_the_row_budget_follows_the_learned_tick_cost_and_out_of_memory():
    policy = BatchPolicy(8, 0.0)
    group = ("tiny", 8, 8)
    assert policy.row_budget(group, 0.0) == 16  # nothing learned: two rows per item of the batch limit
    for rows in (2, 4, 8, 16):  # fixed 10 ms, 5 ms a row: doubling past 18 rows pays less than 10%
        policy.observe(group, rows, 0.010 + 0.005 * rows)
    assert policy.row_budget(group, 0.0) == 16
    for rows in (2, 4, 8, 16):  # a device where rows dominate: 1 ms fixed, 1 ms a row
        for _ in range(40):
            policy.observe(group, rows, 0.001 + 0.001 * rows)
    assert policy.row_budget(group, 0.0) == 9
    policy.out_of_memory(group, 8, now=1.0)
    assert policy.row_budget(group, 1.0) == 4
    assert policy.row_budget(group, 1.0 + OOM_COOLDOWN + 1) == 9


def test_where_batching_no_longer_pays_a_tick_still_holds_enough_rows_for_items_to_join():
    policy = BatchPolicy(8, 0.0)
    group = ("compute-bound", 32, 32)
    for rows in (2, 4, 8, 16):  # nearly no fixed cost: 0.1 ms, and 20 ms a row
        for _ in range(40):
            policy.observe(group, rows, 0.0001 + 0.020 * rows)
    assert policy.row_budget(group, 0.0) == MIN_SHARED_ROWS  # the paying rule alone would say 2
    for rows in (2, 4, 8):  # rows so slow that a tick of MIN_SHARED_ROWS would hold the worker for seconds
        for _ in range(40):
            policy.observe(group, rows, 0.0001 + 0.300 * rows)
    assert policy.row_budget(group, 0.0) == 3  # the tick-time bound still wins: 1 s / 0.3 s
