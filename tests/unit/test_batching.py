"""The batching queue and executor with a fake backend that records its calls (no diffusers, no sleeps)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from batching import BatchKey, BatchQueue, Executor, ItemOutput, QueueFullError, WorkItem
from batching.errors import DeadlineExceededError, InvalidInputError, ItemCancelledError


def key(model="m", steps=8, batchable=True):
    return BatchKey.build(model, "__call__", {"num_inference_steps": steps}, batchable=batchable)


def item(k, prompt="p", seed=0, deadline=None):
    return WorkItem(k, {"prompt": prompt}, seed=seed, deadline=deadline)


class FakeRunner:
    """A Backend that records calls; can hold each call behind an event, and fail on a poison prompt."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[BatchKey, list[str]]] = []
        self.gate = gate
        self.started = threading.Event()

    def warmup(self) -> None:
        pass

    def run_batch(self, key, items, on_step):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        prompts = [i.inputs["prompt"] for i in items]
        self.calls.append((key, prompts))
        if "poison" in prompts:
            raise ValueError("poison prompt")
        return [ItemOutput(f"image:{p}:{i.seed}") for p, i in zip(prompts, items)]


def test_queue_takes_the_oldest_group_first_up_to_the_batch_size():
    clock = iter(range(100)).__next__
    queue = BatchQueue(100, clock=lambda: float(clock()))
    a, b = key(steps=8), key(steps=4)
    queue.put([item(a, "a1")])
    queue.put([item(b, "b1"), item(b, "b2"), item(b, "b3")])
    queue.put([item(a, "a2")])
    first = queue.take(lambda key: 2)
    assert first.key == a and [i.inputs["prompt"] for i in first.items] == ["a1", "a2"]
    second = queue.take(lambda key: 2)
    assert [i.inputs["prompt"] for i in second.items] == ["b1", "b2"]
    assert [i.inputs["prompt"] for i in queue.take(lambda key: 2).items] == ["b3"]


def test_non_batchable_keys_run_one_item_per_call():
    runner = FakeRunner()
    executor = Executor([("fake", lambda: runner)], max_batch_size=8)
    items = [item(key(batchable=False), "x"), item(key(batchable=False), "y")]
    executor.submit(items)  # queued before the worker starts: a batchable key would run both in one call
    executor.start()
    executor.wait_ready(5)
    assert [i.future.result(5).image for i in items] == ["image:x:0", "image:y:0"]
    executor.shutdown(5)
    assert [prompts for _, prompts in runner.calls] == [["x"], ["y"]]


def test_full_queue_refuses_the_whole_request_at_once():
    queue = BatchQueue(3)
    queue.put([item(key()), item(key())])
    with pytest.raises(QueueFullError, match="queue full"):
        queue.put([item(key()), item(key())])
    assert len(queue) == 2


def test_expired_items_never_run_and_get_deadline_exceeded():
    now = [10.0]
    queue = BatchQueue(10, clock=lambda: now[0])
    late = item(key(), "late", deadline=11.0)
    on_time = item(key(), "ok", deadline=100.0)
    queue.put([late, on_time])
    now[0] = 12.0
    batch = queue.take(lambda key: 8)
    assert [i.inputs["prompt"] for i in batch.items] == ["ok"]
    with pytest.raises(DeadlineExceededError):
        late.future.result(0)


def test_executor_batches_waiting_items_and_never_mixes_keys():
    gate = threading.Event()
    runner = FakeRunner(gate)
    executor = Executor([("fake", lambda: runner)], max_batch_size=4)
    executor.start()
    executor.wait_ready(5)
    first = item(key(steps=1), "first")
    executor.submit([first])
    assert runner.started.wait(5)  # the worker is now busy with `first`
    a_items = [item(key(steps=8), f"a{i}", seed=i) for i in range(5)]
    b_items = [item(key(steps=4), f"b{i}") for i in range(2)]
    executor.submit(a_items[:3])
    executor.submit(b_items)
    executor.submit(a_items[3:])
    assert not any(i.future.done() for i in a_items + b_items)
    gate.set()
    for i in [first, *a_items, *b_items]:
        i.future.result(5)
    executor.shutdown(5)
    keys_and_prompts = [(k.kwargs()["num_inference_steps"], p) for k, p in runner.calls]
    assert keys_and_prompts == [(1, ["first"]), (8, ["a0", "a1", "a2", "a3"]), (4, ["b0", "b1"]), (8, ["a4"])]
    assert a_items[2].future.result() == ItemOutput("image:a2:2")


def test_a_poison_item_fails_alone_and_its_batch_mates_succeed():
    gate = threading.Event()
    runner = FakeRunner(gate)
    executor = Executor([("fake", lambda: runner)], max_batch_size=8)
    executor.start()
    executor.wait_ready(5)
    blocker = item(key(steps=1), "blocker")
    executor.submit([blocker])
    assert runner.started.wait(5)
    items = [item(key(), p) for p in ("ok1", "poison", "ok2")]
    executor.submit(items)
    gate.set()
    assert items[0].future.result(5) == ItemOutput("image:ok1:0")
    assert items[2].future.result(5) == ItemOutput("image:ok2:0")
    # The client hears the kind of error, not the library's words.
    with pytest.raises(InvalidInputError, match=r"refused this request.s values \(ValueError\)"):
        items[1].future.result(5)
    executor.shutdown(5)


def test_cancelled_items_never_run():
    gate = threading.Event()
    runner = FakeRunner(gate)
    executor = Executor([("fake", lambda: runner)], max_batch_size=8)
    executor.start()
    executor.wait_ready(5)
    executor.submit([item(key(steps=1), "blocker")])
    assert runner.started.wait(5)
    keep, drop = item(key(), "keep"), item(key(), "drop")
    executor.submit([keep, drop])
    drop.cancel()
    gate.set()
    assert keep.future.result(5) == ItemOutput("image:keep:0")
    executor.shutdown(5)
    assert all("drop" not in prompts for _, prompts in runner.calls)
    assert drop.future.cancelled()


def test_a_failed_worker_start_is_reported():
    def broken():
        raise RuntimeError("no such device")

    executor = Executor([("broken", broken)])
    executor.start()
    with pytest.raises(RuntimeError, match="failed to start"):
        executor.wait_ready(5)
    assert not executor.healthy


def test_future_helpers_ignore_done_futures():
    from batching.items import set_exception, set_result

    future: Future[str] = Future()
    future.cancel()
    set_result(future, "x")
    set_exception(future, RuntimeError())
    assert future.cancelled()


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError on the CPU: the executor recognises it by name."""


class MemoryBoundRunner(FakeRunner):
    """Runs out of memory above a batch size, like a GPU would."""

    def __init__(self, fits: int, gate: threading.Event | None = None) -> None:
        super().__init__(gate)
        self.fits = fits
        self.sizes: list[int] = []

    def run_batch(self, key, items, on_step):
        self.sizes.append(len(items))
        if len(items) > self.fits:
            self.started.set()
            if self.gate is not None:
                self.gate.wait(10)
            raise OutOfMemoryError("CUDA out of memory")
        return super().run_batch(key, items, on_step)


def test_out_of_memory_splits_the_batch_and_lowers_the_limit():
    gate = threading.Event()
    runner = MemoryBoundRunner(fits=2, gate=gate)
    executor = Executor([("gpu", lambda: runner)], max_batch_size=8)
    executor.start()
    executor.wait_ready(5)
    blocker = item(key(steps=1), "blocker")
    executor.submit([blocker])
    assert runner.started.wait(5)
    items = [item(key(), f"p{i}", seed=i) for i in range(8)]
    executor.submit(items)
    gate.set()
    assert [i.future.result(5).image for i in items] == [f"image:p{i}:{i}" for i in range(8)]
    assert runner.sizes[1:] == [8, 4, 2, 2, 4, 2, 2]  # halved until it fits
    assert executor.policy.limit(key(), executor._clock()) == 2  # lowered to what fits, for a while
    executor.shutdown(5)


def test_a_single_item_out_of_memory_gets_resource_exhausted_and_the_worker_lives():
    from batching import OutOfMemoryError as ExecutorOOM

    runner = MemoryBoundRunner(fits=0)
    executor = Executor([("gpu", lambda: runner)], max_batch_size=8)
    executor.start()
    executor.wait_ready(5)
    lone = item(key(), "big")
    executor.submit([lone])
    with pytest.raises(ExecutorOOM):
        lone.future.result(5)
    assert executor.healthy


def test_a_deadline_shorter_than_a_known_call_is_refused_at_once():
    now = [100.0]
    executor = Executor([("fake", FakeRunner)], clock=lambda: now[0])
    for size in (1, 2, 4):
        executor.policy.observe(key(), size, 0.5 + 0.1 * size)
    with pytest.raises(DeadlineExceededError, match="its run takes about"):
        executor.submit([item(key(), deadline=100.2)])
    executor.submit([item(key(), deadline=101.0)])  # enough time: accepted (the worker is not started)
    assert len(executor.queue) == 1


def test_two_workers_run_batches_at_the_same_time():
    gates = [threading.Event(), threading.Event()]
    runners = [FakeRunner(gates[0]), FakeRunner(gates[1])]
    executor = Executor([("cpu#0", lambda: runners[0]), ("cpu#1", lambda: runners[1])], max_batch_size=4)
    executor.start()
    executor.wait_ready(5)
    first, second = item(key(steps=1), "a"), item(key(steps=2), "b")
    executor.submit([first])
    executor.submit([second])
    assert runners[0].started.wait(5) and runners[1].started.wait(5)  # both busy at once
    for gate in gates:
        gate.set()
    assert {first.future.result(5).image, second.future.result(5).image} == {"image:a:0", "image:b:0"}
    executor.shutdown(5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker dies on purpose
def test_a_worker_that_dies_fails_its_items_and_the_queue_with_unavailable():
    from batching import WorkerUnavailableError

    class Dying(FakeRunner):
        def run_batch(self, key, items, on_step):
            raise SystemExit("killed")

    deaths = []
    executor = Executor([("only", Dying)], max_batch_size=1)
    executor.on_unhealthy = lambda: deaths.append(True)
    executor.start()
    executor.wait_ready(5)
    running, queued = item(key(), "running"), item(key(), "queued")
    executor.submit([running, queued])
    with pytest.raises(WorkerUnavailableError):
        running.future.result(5)
    with pytest.raises(WorkerUnavailableError):
        queued.future.result(5)
    assert deaths == [True] and not executor.healthy
    with pytest.raises(WorkerUnavailableError):
        executor.submit([item(key(), "late")])
    executor.shutdown(5)  # joins the dead thread while this test's warning filter applies


def test_a_request_larger_than_the_batch_limit_is_split_across_calls():
    runner = FakeRunner()
    executor = Executor([("fake", lambda: runner)], max_batch_size=2)
    items = [item(key(), f"p{i}", seed=40 + i) for i in range(5)]  # num_images=5: seeds seed, seed+1, ...
    executor.submit(items)  # queued before the worker starts
    executor.start()
    executor.wait_ready(5)
    assert [i.future.result(5).image for i in items] == [f"image:p{i}:{40 + i}" for i in range(5)]
    executor.shutdown(5)
    assert [len(prompts) for _, prompts in runner.calls] == [2, 2, 1]


# --- regressions: the executor bugs the seam review found -------------------------------------------------------


class MiscountingRunner(FakeRunner):
    """Returns one result too few for batches of `short_at` items or more: a backend bug."""

    def __init__(self, short_at: int, gate: threading.Event | None = None) -> None:
        super().__init__(gate)
        self.short_at = short_at

    def run_batch(self, key, items, on_step):
        results = super().run_batch(key, items, on_step)
        return results[:-1] if len(items) >= self.short_at else results


def _started(runner, **options):
    executor = Executor([("fake", lambda: runner)], **options)
    executor.start()
    executor.wait_ready(5)
    return executor


def test_a_result_count_mismatch_fails_exactly_that_call_and_the_worker_keeps_serving():
    from batching import ResultMismatchError

    gate = threading.Event()
    runner = MiscountingRunner(short_at=2, gate=gate)
    executor = _started(runner, max_batch_size=8)
    executor.submit([item(key(steps=1), "blocker")])
    assert runner.started.wait(5)
    items = [item(key(), f"p{i}") for i in range(3)]
    executor.submit(items)
    gate.set()
    for queued in items:
        with pytest.raises(ResultMismatchError, match="2 results for 3 items"):
            queued.future.result(5)
    after = item(key(steps=2), "after")
    executor.submit([after])
    assert after.future.result(5) == ItemOutput("image:after:0")  # the worker lives on
    assert executor.healthy
    executor.shutdown(5)


def test_a_result_of_the_wrong_type_fails_its_items():
    from batching import CallOutput, ResultMismatchError

    class Untyped(FakeRunner):
        def run_batch(self, key, items, on_step):
            return [CallOutput({"x": 1}) for _ in items]  # a task batch must give ItemOutputs

    executor = _started(Untyped())
    lone = item(key(), "x")
    executor.submit([lone])
    with pytest.raises(ResultMismatchError, match="must give ItemOutput"):
        lone.future.result(5)
    executor.shutdown(5)


def test_a_retry_that_returns_the_wrong_count_fails_only_its_item():
    from batching import ResultMismatchError

    class PoisonThenMiscount(FakeRunner):
        """The batch fails on a poison prompt; retried alone, the item 'bad' gets no result at all."""

        def run_batch(self, key, items, on_step):
            results = super().run_batch(key, items, on_step)
            return [] if [i.inputs["prompt"] for i in items] == ["bad"] else results

    gate = threading.Event()
    runner = PoisonThenMiscount(gate)
    executor = _started(runner, max_batch_size=8)
    executor.submit([item(key(steps=1), "blocker")])
    assert runner.started.wait(5)
    items = [item(key(), p) for p in ("ok", "poison", "bad")]
    executor.submit(items)
    gate.set()
    assert items[0].future.result(5) == ItemOutput("image:ok:0")
    with pytest.raises(InvalidInputError):
        items[1].future.result(5)
    with pytest.raises(ResultMismatchError, match="0 results for 1 items"):
        items[2].future.result(5)
    assert executor.healthy
    executor.shutdown(5)


def test_only_completed_uninterrupted_calls_teach_the_cost_model_at_their_real_size():
    observed = []

    class Interruptible(FakeRunner):
        def run_batch(self, key, items, on_step):
            self.started.set()
            if self.gate is not None:
                self.gate.wait(10)
            for step in range(1, 4):
                if not on_step(step, 3, None):
                    return [ItemOutput("partial") for _ in items]  # stopped early, as diffusers does
            return super().run_batch(key, items, on_step)

    gate = threading.Event()
    runner = Interruptible(gate)
    executor = _started(runner, max_batch_size=8)
    executor.policy.observe = lambda k, size, seconds: observed.append((k, size))
    first = item(key(steps=1), "first")
    executor.submit([first])
    assert runner.started.wait(5)
    first.cancel()  # its caller goes away mid-run: the call is interrupted at its next step
    gate.set()
    with pytest.raises(ItemCancelledError):
        first.future.result(5)
    retried = [item(key(), p) for p in ("ok", "poison")]
    executor.submit(retried)
    assert retried[0].future.result(5).image == "image:ok:0"
    executor.shutdown(5)
    # Not the interrupted call, nor the failed batch of two; the two retries, each at the size it ran (1).
    assert observed == [(key(), 1)]


def client_item(k, client, cost=1):
    return WorkItem(key=k, inputs={"prompt": "p"}, seed=0, client=client, cost=cost)


def test_a_client_beyond_its_share_is_queued_only_while_no_one_else_waits_and_a_share_stays_free():
    queue = BatchQueue(max_items=8)  # share: 2
    k = key()
    for _ in range(6):  # alone: up to what leaves a share (2) free for others
        queue.put([client_item(k, "flood")])
    with pytest.raises(QueueFullError, match="for this client"):
        queue.put([client_item(k, "flood")])
    queue.put([client_item(k, "polite"), client_item(k, "polite")])  # its share, although the flood came first
    assert len(queue) == 8
    with pytest.raises(QueueFullError):
        queue.put([client_item(k, "third")])  # the queue itself is full


def test_a_call_that_makes_several_images_takes_that_much_of_the_queue():
    queue = BatchQueue(max_items=8, max_per_client=8)
    queue.put([client_item(key(), "a", cost=5)])
    assert len(queue) == 5
    with pytest.raises(QueueFullError, match="request needs 4"):
        queue.put([client_item(key(), "b", cost=4)])


def test_workers_take_round_robin_across_clients_across_takes():
    queue = BatchQueue(max_items=32, max_per_client=32)
    k = key()
    for _ in range(6):
        queue.put([client_item(k, "flood")])
    queue.put([client_item(k, "polite"), client_item(k, "polite")])
    order = [queue.take(lambda _: 1).items[0].client for _ in range(8)]
    assert order[:4] == ["flood", "polite", "flood", "polite"], order
