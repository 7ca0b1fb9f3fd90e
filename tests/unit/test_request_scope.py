"""A request's log line reports the wall time its items ran, not the sum over items."""

from __future__ import annotations

from batching import BatchKey, WorkItem
from service.scope import RequestScope


def test_run_ms_is_the_wall_time_of_a_batch_not_the_sum_of_its_items():
    key = BatchKey.build("m", "__call__", {})
    items = [WorkItem(key, {"prompt": "p"}, seed=seed) for seed in range(8)]
    for item in items:  # eight images of one request ran together in one 2-second call
        item.trace.started, item.trace.finished = 10.0, 12.0
    items[-1].trace.finished = 12.5  # the last leaves half a second later (the step engine)
    scope = RequestScope("id", "TextToImage", items=items)
    assert scope.run_ms() == 2500.0


def test_run_ms_is_zero_before_anything_ran():
    key = BatchKey.build("m", "__call__", {})
    assert RequestScope("id", "Stream", items=[WorkItem(key, {}, seed=0)]).run_ms() == 0.0
