"""The executor: one worker thread per device replica, each taking work from a shared queue.

Each worker builds its own backend (its own pipeline replica and schedulers) inside its thread, because
diffusers schedulers are stateful and must never be shared across threads. A worker runs two kinds of work:
- request batches (`WorkKind.TASK`, `WorkKind.CALL`): one whole pipeline call per batch (`Backend.run_batch`);
- step work (`WorkKind.STEP`), when its backend has a step engine: items join a running denoising batch and
  leave it at step boundaries. The worker loop below admits items between ticks (`StepBackend.join`) and runs
  one tick at a time (`StepBackend.tick`), so a free slot is refilled at the next step, not the next request.
Futures are resolved, progress is fanned out and the cost model is fed here, in one place, whatever the kind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import (
    DeadlineExceededError,
    InvalidInputError,
    ItemCancelledError,
    OutOfMemoryError,
    WorkerUnavailableError,
)
from .items import BatchKey, StepEvent, WorkItem, WorkKind, set_exception, set_result
from .policy import BatchPolicy
from .queue import Batch, BatchQueue, Clock
from .results import check_results

log = logging.getLogger(__name__)
SHUTDOWN_SETTLE_SECONDS = 5.0  # after a forced shutdown, how long workers get to leave their current step


class StepHook(Protocol):
    """Called by a backend after each denoising step of a request-batched call; returns False to interrupt."""

    def __call__(self, step: int, total: int, latents: Any = None) -> bool: ...


class Backend(Protocol):
    """What one worker runs work on: its device's replica of every served model. Called only from its thread."""

    def warmup(self) -> None:
        """Run once before the worker takes work, so the first request does not pay for lazy init."""

    def run_batch(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> Sequence[Any]:
        """Run the items as one call; return one result per item, in order. Raise to fail the whole call."""


@dataclass
class Tick:
    """What one denoising step of the step engine did."""

    group: Hashable  # the active set that ran (its cost is learned per group); None when no set ran
    rows: int  # rows in the denoiser call
    seconds: float  # time of the step and the decode of leaving items; joins' preparation excluded
    progress: list[tuple[WorkItem, StepEvent]] = field(default_factory=list)
    finished: list[tuple[WorkItem, Any]] = field(default_factory=list)  # results of items that left
    failed: list[tuple[WorkItem, BaseException]] = field(default_factory=list)  # items that left with an error
    evicted: list[WorkItem] = field(default_factory=list)  # items put back in the queue (out of memory)
    out_of_memory: bool = False  # the tick ran out of memory at `rows`: lower the group's row budget
    active: int = 0  # items in the set that ran
    in_flight: int = 0  # items the engine holds after the tick, every set counted
    join_waits: list[float] = field(default_factory=list)  # join-to-first-step seconds of items new to this tick
    keys: frozenset[BatchKey] = frozenset()  # the batch keys of the items that took the step


@runtime_checkable
class StepBackend(Protocol):
    """A backend with a step engine: continuous batching at denoising-step boundaries."""

    @property
    def busy(self) -> bool:
        """Whether any item is in the middle of its denoising."""

    def step_load(self, key: BatchKey) -> tuple[Hashable, int, int]:
        """(group, items, rows) of the active set that items of `key` would join."""

    def join(self, key: BatchKey, items: Sequence[WorkItem]) -> None:
        """Items join at the next tick (prepared there, together); those that fail to start fail in that tick."""

    def tick(self) -> Tick:
        """Run one denoising step of one active set; items whose last step it was leave."""

    def abandon(self) -> list[WorkItem]:
        """Drop every active item (after a bug in the engine); returns them so their callers can be told."""


BackendFactory = Callable[[], Backend]


@dataclass(frozen=True)
class BatchReport:
    """What happened to one pipeline call or one tick, for metrics and the benchmark."""

    worker: str
    key: BatchKey | None  # None for a tick, which can mix signatures
    size: int  # items (request batches) or rows (ticks)
    queue_wait: Sequence[float]
    run_seconds: float
    outcome: str  # "ok", "error", "interrupted", "tick"
    model: str = ""
    active: int = 0  # ticks: items in the set that ran
    join_waits: Sequence[float] = ()  # ticks: join-to-first-step seconds of the items new to the tick
    cancelled: int = 0  # ticks: items that left cancelled (their callers gone) before their last step
    in_flight: int = 0  # ticks: items the worker's engine holds after the tick


class Executor:
    """Queues work items and runs them on per-device worker threads."""

    def __init__(
        self,
        backend_factories: Sequence[tuple[str, BackendFactory]],
        *,
        max_batch_size: int = 8,
        max_queue: int = 256,
        max_queue_per_client: int | None = None,
        max_wait: float = 0.0,
        clock: Clock = time.monotonic,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        if not backend_factories:
            raise ValueError("the executor needs at least one worker")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.policy = BatchPolicy(max_batch_size, max_wait)
        self.queue = BatchQueue(max_queue, clock, self.policy, max_queue_per_client)
        self._clock = clock
        self._on_batch = on_batch
        self._factories = list(backend_factories)
        self._threads: list[threading.Thread] = []
        self._ready = threading.Semaphore(0)
        self._failed: list[BaseException] = []
        self._dead: set[str] = set()
        self._running: set[WorkItem] = set()  # items a worker has taken and not finished (for a forced shutdown)
        self._running_lock = threading.Lock()
        self._fastest_tick: dict[BatchKey, float] = {}  # step work: the fastest tick seen per key (seconds)
        self.on_unhealthy: Callable[[], None] | None = None  # called from a worker thread that dies

    # --- lifecycle -----------------------------------------------------------------------------------------

    def now(self) -> float:
        """The executor's clock (its items' times are on it)."""
        return self._clock()

    def start(self) -> None:
        for name, factory in self._factories:
            thread = threading.Thread(target=self._work, args=(name, factory), name=f"worker-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has built and warmed its backend; raise if one failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._ready.acquire(timeout=remaining):
                raise TimeoutError("workers did not become ready in time")
        if self._failed:
            raise RuntimeError(f"a worker failed to start: {self._failed[0]!r}") from self._failed[0]

    @property
    def healthy(self) -> bool:
        """True while every worker thread is alive."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._failed and not self._dead

    def shutdown(self, timeout: float | None = None, settle: float = SHUTDOWN_SETTLE_SECONDS) -> bool:
        """Stop taking new work and let the workers finish what is queued and running, for `timeout` seconds.

        Then whatever is left, queued or running, fails with WorkerUnavailableError (UNAVAILABLE, the one status a
        drain that ran out of time gives), and running calls are interrupted at their next step. Returns whether
        every worker thread has then stopped within `settle` more seconds: a thread still inside a long step
        must not be running torch code while the interpreter exits.
        """
        self.queue.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        error = WorkerUnavailableError("the server is shutting down: the drain's grace period ran out")
        left = self.queue.fail_all(error)
        with self._running_lock:
            running = list(self._running)
        for item in running:
            set_exception(item.future, error)
            item.cancel()  # the worker drops it (step engine) or interrupts its call (request batches)
        if left or running:
            log.warning("shutdown: the grace period ran out; %d queued and %d running items failed", left, len(running))
        settled = time.monotonic() + settle
        for thread in self._threads:
            thread.join(max(0.0, settled - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _started(self, item: WorkItem) -> bool:
        """Mark an item running (False when it was cancelled first), and track it until it is done."""
        if not item.future.set_running_or_notify_cancel():
            return False
        with self._running_lock:
            self._running.add(item)
        item.future.add_done_callback(lambda _: self._forget(item))
        return True

    def _forget(self, item: WorkItem) -> None:
        with self._running_lock:
            self._running.discard(item)

    # --- submitting ----------------------------------------------------------------------------------------

    def submit(self, items: Sequence[WorkItem]) -> None:
        """Queue the items (all or none). Raises QueueFullError, WorkerUnavailableError, or DeadlineExceededError
        when a deadline is shorter than a call of this kind is known to take."""
        if not self.healthy and self._threads:
            raise WorkerUnavailableError("no live worker")
        first = items[0] if items else None
        if first is not None and first.deadline is not None:
            if first.key.kind is WorkKind.STEP:  # at least its steps at the fastest tick its kind has run
                fastest = self._fastest_tick.get(first.key)
                estimate = fastest * first.steps if fastest is not None and first.steps else None
            else:
                estimate = self.policy.estimate(first.key, 1)
            left = first.deadline - self._clock()
            if estimate is not None and left < estimate:
                raise DeadlineExceededError(f"the deadline leaves {left:.3f}s; its run takes about {estimate:.3f}s")
        self.queue.put(items)

    # --- workers -------------------------------------------------------------------------------------------

    def _work(self, name: str, factory: BackendFactory) -> None:
        try:
            backend = factory()
            backend.warmup()
        except BaseException as exc:
            log.exception("worker %s failed to start", name)
            self._failed.append(exc)
            self._ready.release()
            return
        self._ready.release()
        try:
            self._serve(name, backend)
        except BaseException:
            log.exception("worker %s died", name)
            self._dead.add(name)
            if not any(t.is_alive() for t in self._threads if t is not threading.current_thread()):
                self.queue.close()
                self.queue.fail_all(WorkerUnavailableError("every worker has died"))
            if self.on_unhealthy is not None:
                self.on_unhealthy()
            raise

    def _serve(self, name: str, backend: Backend) -> None:
        """The worker loop: take work (blocking only when nothing is denoising), run it, then tick."""
        stepper = backend if isinstance(backend, StepBackend) else None
        while True:
            busy = stepper is not None and stepper.busy
            batch = self.queue.take(lambda key: self._room(stepper, key), block=not busy)
            if batch is not None and batch.key.kind is WorkKind.STEP and stepper is not None:
                self._join(name, stepper, batch)
                continue  # admit everything that is waiting and fits: joiners of one tick are prepared together
            if batch is not None:
                self._run(name, backend, batch)
            elif not busy:
                return  # closed and drained
            if stepper is not None and stepper.busy:
                self._tick(name, stepper)

    def _room(self, stepper: StepBackend | None, key: BatchKey) -> int:
        """How many items of `key` a worker may take now."""
        if key.kind is not WorkKind.STEP:
            return 1 if not key.batchable else min(self.max_batch_size, self.policy.limit(key, self._clock()))
        if stepper is None:
            return 0
        group, items, rows = stepper.step_load(key)
        budget = self.policy.row_budget(group, self._clock())
        # Each joining item may bring two rows (classifier-free guidance); one item always fits an empty set.
        by_rows = max(0, (budget - rows) // 2) if items else max(1, budget // 2)
        return max(0, min(self.max_batch_size - items, by_rows))

    # --- request batches -----------------------------------------------------------------------------------

    def _run(self, name: str, backend: Backend, batch: Batch) -> None:
        waits = {id(item): wait for item, wait in zip(batch.items, batch.queue_wait)}
        items = [item for item in batch.items if self._started(item)]
        for item in items:
            item.trace.queue_wait = waits[id(item)]
        self._attempt(name, backend, batch.key, items)

    def _attempt(self, name: str, backend: Backend, key: BatchKey, items: list[WorkItem]) -> None:
        """Run items as one call. The first run and every retry come here, so each is checked and observed alike:
        results must fit the items, and only a completed, uninterrupted call teaches the cost model."""
        live = self._drop_cancelled(items)
        if not live:
            return
        started = self._clock()
        progress = _Progress(live, started, self._clock)
        try:
            results = backend.run_batch(key, live, progress)
            check_results(key.kind, live, results)
        except BaseException as exc:
            # Report first: callers learn the outcome from their futures, and may read metrics right after.
            self._report(name, key, live, started, "error")
            self._fail(name, backend, key, live, exc)
            return
        finished = self._clock()
        if not progress.interrupted:
            self.policy.observe(key, len(live), finished - started)
        self._report(name, key, live, started, "interrupted" if progress.interrupted else "ok")
        now = self._clock()
        for item, result in zip(live, results):
            if item.cancel_requested:  # the caller has gone; an interrupted call's output is partial anyway
                set_exception(item.future, ItemCancelledError("cancelled while running"))
            elif progress.interrupted or _expired(item, now):
                set_exception(item.future, DeadlineExceededError("the deadline passed while the item was running"))
            else:
                set_result(item.future, result)

    def _fail(self, name: str, backend: Backend, key: BatchKey, items: list[WorkItem], exc: BaseException) -> None:
        if not isinstance(exc, Exception):  # the worker itself is going down: its callers must not hang
            for item in items:
                set_exception(item.future, WorkerUnavailableError(f"worker {name} died"))
            raise exc
        if all(item.cancel_requested for item in items):
            for item in items:
                set_exception(item.future, ItemCancelledError("cancelled while running"))
            return
        if is_out_of_memory(exc):
            self._split_after_oom(name, backend, key, items)
            return
        if len(items) == 1 or not _retryable(exc):
            for item in items:
                set_exception(item.future, _classify(exc))
            return
        log.warning("worker %s: batch of %d failed (%r); retrying items alone", name, len(items), exc)
        for item in items:  # failure isolation: only an item that fails alone gets the error
            self._attempt(name, backend, key, [item])

    def _split_after_oom(self, name: str, backend: Backend, key: BatchKey, items: list[WorkItem]) -> None:
        """Out of memory: lower the key's batch limit for a while and run the batch in halves (recursively)."""
        self.policy.out_of_memory(key, len(items), self._clock())
        if len(items) == 1:
            set_exception(items[0].future, OutOfMemoryError("out of device memory even for a single image"))
            return
        log.warning("worker %s: out of memory at batch %d; splitting", name, len(items))
        empty_device_cache()
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            self._attempt(name, backend, key, part)

    # --- step work -----------------------------------------------------------------------------------------

    def _join(self, name: str, stepper: StepBackend, batch: Batch) -> None:
        now = self._clock()
        items = []
        for item, wait in zip(batch.items, batch.queue_wait):
            if item.future.running():  # resumes after an eviction: it keeps its state and its first start
                items.append(item)
            elif self._started(item):
                item.trace.queue_wait, item.trace.started = wait, now
                items.append(item)
        try:
            stepper.join(batch.key, items)
        except BaseException as exc:  # a bug, or the worker going down: these callers must not hang
            self._fail_step_items(name, items, exc)

    def _tick(self, name: str, stepper: StepBackend) -> None:
        try:
            tick = stepper.tick()
        except BaseException as exc:  # a bug in the engine's loop: fail what it held, keep the worker serving
            self._fail_step_items(name, stepper.abandon(), exc)
            return
        now = self._clock()
        if tick.out_of_memory:
            self.policy.out_of_memory(tick.group, tick.rows, now)
            empty_device_cache()
        elif tick.rows and not tick.failed:
            self.policy.observe(tick.group, tick.rows, tick.seconds)
        if tick.evicted:
            self.queue.put_back(tick.evicted)
        for key in tick.keys:  # a lower bound on any item's run: its steps x the fastest tick of its kind
            if tick.seconds < self._fastest_tick.get(key, float("inf")):
                self._fastest_tick[key] = tick.seconds
        for item, event in tick.progress:
            _send_progress(item, event)
        for item, _ in tick.finished + tick.failed:
            item.trace.finished = now
        if tick.rows or tick.failed:
            cancelled = sum(isinstance(error, ItemCancelledError) for _, error in tick.failed)
            report = BatchReport(
                name,
                None,
                tick.rows,
                (),
                tick.seconds,
                "tick",
                _model_of(tick),
                active=tick.active,
                join_waits=tuple(tick.join_waits),
                cancelled=cancelled,
                in_flight=tick.in_flight,
            )
            self._emit(report)
        for item, result in tick.finished:
            set_result(item.future, result)
        for item, error in tick.failed:
            set_exception(item.future, _classify(error))

    @staticmethod
    def _fail_step_items(name: str, items: Sequence[WorkItem], exc: BaseException) -> None:
        """The engine failed outside any one item (a bug), or the worker is going down (re-raised)."""
        if isinstance(exc, Exception):
            log.error("worker %s: the step engine failed; failing its %d items", name, len(items), exc_info=exc)
        error = exc if isinstance(exc, Exception) else WorkerUnavailableError(f"worker {name} died")
        for item in items:
            set_exception(item.future, error)
        if not isinstance(exc, Exception):
            raise exc

    # --- shared --------------------------------------------------------------------------------------------

    @staticmethod
    def _drop_cancelled(items: list[WorkItem]) -> list[WorkItem]:
        live = []
        for item in items:
            if item.cancel_requested:
                set_exception(item.future, ItemCancelledError("cancelled while running"))
            else:
                live.append(item)
        return live

    def _report(self, name: str, key: BatchKey, items: list[WorkItem], started: float, outcome: str) -> None:
        finished = self._clock()
        for item in items:
            item.trace.started, item.trace.finished, item.trace.batch_size = started, finished, len(items)
        waits = [item.trace.queue_wait for item in items]
        self._emit(BatchReport(name, key, len(items), waits, finished - started, outcome, key.model))

    def _emit(self, report: BatchReport) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(report)
            except Exception:  # observers must never break a worker
                log.exception("batch observer failed")


class _Progress:
    """The step hook of one request-batched call: progress events per item, and an interrupt once every item
    has been cancelled. Remembers whether it interrupted, so a cut-short call never teaches the cost model."""

    def __init__(self, items: Sequence[WorkItem], started: float, clock: Clock) -> None:
        self.items = items
        self.started = started
        self.clock = clock
        self.interrupted = False

    def __call__(self, step: int, total: int, latents: Any = None) -> bool:
        per_item = latents is not None and getattr(latents, "shape", (0,))[0] == len(self.items)
        elapsed = self.clock() - self.started
        for index, item in enumerate(self.items):
            _send_progress(item, StepEvent(step, total, elapsed, latents[index] if per_item else None))
        now = self.clock()
        if all(item.cancel_requested or _expired(item, now) for item in self.items):
            self.interrupted = True  # nobody waits for this call's result any more
        return not self.interrupted


def _expired(item: WorkItem, now: float) -> bool:
    return item.deadline is not None and now >= item.deadline


def _send_progress(item: WorkItem, event: StepEvent) -> None:
    if item.on_progress is not None and not item.cancel_requested:
        try:
            item.on_progress(event)
        except Exception:
            log.exception("progress callback failed")


def _model_of(tick: Tick) -> str:
    """The model whose set took the step (a set is one model's), for the tick's metrics."""
    for key in tick.keys:
        return key.model
    for item, _ in tick.finished or tick.failed or tick.progress:
        return item.key.model
    return "unknown"


def empty_device_cache() -> None:
    """Release cached device memory after an out-of-memory error (only if the backend uses torch)."""
    import sys

    torch = sys.modules.get("torch")  # batching never imports torch itself
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (and any error type of that name, such as a test's) without importing torch."""
    return any(kind.__name__ == "OutOfMemoryError" for kind in type(exc).__mro__) and not isinstance(
        exc, OutOfMemoryError
    )


def _retryable(exc: BaseException) -> bool:
    """A result mismatch is our own bug, the same however the items are grouped: never retried."""
    from .errors import ResultMismatchError

    return not isinstance(exc, ResultMismatchError)


def _classify(exc: BaseException) -> BaseException:
    """Pipelines signal bad input with ValueError/TypeError; everything else is a bug or a device fault.

    A library's own message never reaches the client verbatim (it can name files, settings, internals): the
    client hears the kind of error, the log has the message. Errors of ours that speak to the client say so
    with `client_message = True`."""
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, InvalidInputError):
        if getattr(exc, "client_message", False):
            return InvalidInputError(str(exc))
        log.warning("the pipeline refused an item's values: %s: %s", type(exc).__name__, str(exc)[:500])
        return InvalidInputError(f"the pipeline refused this request's values ({type(exc).__name__})")
    return exc
