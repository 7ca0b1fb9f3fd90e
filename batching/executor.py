"""The executor: one worker thread per device replica, each taking batches from a shared queue.

Each worker builds its own runner (its own pipeline replica and schedulers) inside its thread, because
diffusers schedulers are stateful and must never be shared across threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import (
    DeadlineExceededError,
    InvalidInputError,
    ItemCancelledError,
    OutOfMemoryError,
    WorkerUnavailableError,
)
from .items import BatchKey, StepEvent, WorkItem, set_exception, set_result
from .policy import BatchPolicy
from .queue import Batch, BatchQueue, Clock

log = logging.getLogger(__name__)

StepHook = Callable[[int, int, Any], bool]
"""Called by a runner after each step with (step, total, batch latents or None); returns False to interrupt."""


class BatchRunner(Protocol):
    """Runs batches on one device replica. Called only from its worker's thread."""

    def warmup(self) -> None:
        """Run once before the worker takes work, so the first request does not pay for lazy init."""

    def run_batch(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> Sequence[Any]:
        """Run the items as one call; return one result per item, in order. Raise to fail the whole call."""


RunnerFactory = Callable[[], BatchRunner]


@dataclass(frozen=True)
class BatchReport:
    """What happened to one batch, for metrics and the benchmark."""

    worker: str
    key: BatchKey
    size: int
    queue_wait: Sequence[float]
    run_seconds: float
    outcome: str  # "ok", "error", "interrupted"


class Executor:
    """Queues work items and runs them in batches on per-device worker threads."""

    def __init__(
        self,
        runner_factories: Sequence[tuple[str, RunnerFactory]],
        *,
        max_batch_size: int = 8,
        max_queue: int = 256,
        max_wait: float = 0.0,
        clock: Clock = time.monotonic,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        if not runner_factories:
            raise ValueError("the executor needs at least one worker")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.policy = BatchPolicy(max_batch_size, max_wait)
        self.queue = BatchQueue(max_queue, clock, self.policy)
        self._clock = clock
        self._on_batch = on_batch
        self._factories = list(runner_factories)
        self._threads: list[threading.Thread] = []
        self._ready = threading.Semaphore(0)
        self._failed: list[BaseException] = []
        self._dead: set[str] = set()
        self.on_unhealthy: Callable[[], None] | None = None  # called from a worker thread that dies

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        for name, factory in self._factories:
            thread = threading.Thread(target=self._work, args=(name, factory), name=f"worker-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has built and warmed its runner; raise if one failed."""
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

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking new work, let workers drain the queue, then fail whatever is left."""
        self.queue.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.queue.fail_all(WorkerUnavailableError("the server is shutting down"))

    # --- submitting ----------------------------------------------------------------------------------------

    def submit(self, items: Sequence[WorkItem]) -> None:
        """Queue the items (all or none). Raises QueueFullError, WorkerUnavailableError, or DeadlineExceededError
        when a deadline is shorter than a call of this kind is known to take."""
        if not self.healthy and self._threads:
            raise WorkerUnavailableError("no live worker")
        if items and items[0].deadline is not None:
            estimate = self.policy.estimate(items[0].key, 1)
            left = items[0].deadline - self._clock()
            if estimate is not None and left < estimate:
                raise DeadlineExceededError(f"the deadline leaves {left:.3f}s; a call takes about {estimate:.3f}s")
        self.queue.put(items)

    # --- workers -------------------------------------------------------------------------------------------

    def _work(self, name: str, factory: RunnerFactory) -> None:
        try:
            runner = factory()
            runner.warmup()
        except BaseException as exc:
            log.exception("worker %s failed to start", name)
            self._failed.append(exc)
            self._ready.release()
            return
        self._ready.release()
        try:
            while (batch := self.queue.take(self.max_batch_size)) is not None:
                self._run(name, runner, batch)
        except BaseException:
            log.exception("worker %s died", name)
            self._dead.add(name)
            if not any(t.is_alive() for t in self._threads if t is not threading.current_thread()):
                self.queue.close()
                self.queue.fail_all(WorkerUnavailableError("every worker has died"))
            if self.on_unhealthy is not None:
                self.on_unhealthy()
            raise

    def _run(self, name: str, runner: BatchRunner, batch: Batch) -> None:
        items = [item for item in batch.items if item.future.set_running_or_notify_cancel()]
        if not items:
            return
        waits = [w for item, w in zip(batch.items, batch.queue_wait) if item in items]
        started = self._clock()
        try:
            results = runner.run_batch(batch.key, items, self._step_hook(items, started))
        except BaseException as exc:
            # Report first: callers learn the outcome from their futures, and may read metrics right after.
            self._report(name, batch.key, items, waits, self._clock() - started, "error")
            self._fail(name, runner, batch.key, items, exc)
            return
        run_seconds = self._clock() - started
        self.policy.observe(batch.key, len(items), run_seconds)
        if len(results) != len(items):
            raise RuntimeError(f"runner returned {len(results)} results for {len(items)} items")
        interrupted = all(item.cancel_requested for item in items)
        self._report(name, batch.key, items, waits, run_seconds, "interrupted" if interrupted else "ok")
        for item, result in zip(items, results):
            if item.cancel_requested:  # the caller has gone; an interrupted call's output is partial anyway
                set_exception(item.future, ItemCancelledError("cancelled while running"))
            else:
                set_result(item.future, result)

    def _report(
        self, name: str, key: BatchKey, items: list[WorkItem], waits: list[float], run_seconds: float, outcome: str
    ) -> None:
        for item, wait in zip(items, waits):
            item.trace.queue_wait, item.trace.run_seconds, item.trace.batch_size = wait, run_seconds, len(items)
        if self._on_batch is not None:
            try:
                self._on_batch(BatchReport(name, key, len(items), waits, run_seconds, outcome))
            except Exception:  # observers must never break a worker
                log.exception("batch observer failed")

    def _fail(self, name: str, runner: BatchRunner, key: BatchKey, items: list[WorkItem], exc: BaseException) -> None:
        if not isinstance(exc, Exception):  # the worker itself is going down: its callers must not hang
            for item in items:
                set_exception(item.future, WorkerUnavailableError(f"worker {name} died"))
            raise exc
        if all(item.cancel_requested for item in items):
            for item in items:
                set_exception(item.future, ItemCancelledError("cancelled while running"))
            return
        if is_out_of_memory(exc):
            self._split_after_oom(name, runner, key, items)
            return
        if len(items) == 1:
            set_exception(items[0].future, _classify(exc))
            return
        log.warning("worker %s: batch of %d failed (%r); retrying items alone", name, len(items), exc)
        for item in items:  # failure isolation: only an item that fails alone gets the error
            self._retry(name, runner, key, [item])

    def _split_after_oom(self, name: str, runner: BatchRunner, key: BatchKey, items: list[WorkItem]) -> None:
        """Out of memory: lower the key's batch limit for a while and run the batch in halves (recursively)."""
        self.policy.out_of_memory(key, len(items), self._clock())
        if len(items) == 1:
            set_exception(items[0].future, OutOfMemoryError("out of device memory even for a single image"))
            return
        log.warning("worker %s: out of memory at batch %d; splitting", name, len(items))
        self._empty_device_cache()
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            self._retry(name, runner, key, part)

    def _retry(self, name: str, runner: BatchRunner, key: BatchKey, items: list[WorkItem]) -> None:
        """Run part of a failed batch again; a failure goes through the same handling as the first one."""
        live = []
        for item in items:
            if item.cancel_requested:
                set_exception(item.future, ItemCancelledError("cancelled while running"))
            else:
                live.append(item)
        if not live:
            return
        try:
            results = runner.run_batch(key, live, self._step_hook(live, self._clock()))
        except BaseException as exc:
            self._fail(name, runner, key, live, exc)
            return
        for item, result in zip(live, results):
            set_result(item.future, result)

    @staticmethod
    def _empty_device_cache() -> None:
        import sys

        torch = sys.modules.get("torch")  # only if the runner uses torch: batching never imports it
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _step_hook(self, items: Sequence[WorkItem], started: float) -> StepHook:
        def on_step(step: int, total: int, latents: Any = None) -> bool:
            per_item = latents is not None and getattr(latents, "shape", (0,))[0] == len(items)
            elapsed = self._clock() - started
            for index, item in enumerate(items):
                if item.on_progress is not None and not item.cancel_requested:
                    event = StepEvent(step, total, elapsed, latents[index] if per_item else None)
                    try:
                        item.on_progress(event)
                    except Exception:
                        log.exception("progress callback failed")
            return not all(item.cancel_requested for item in items)

        return on_step


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (and any error type of that name, such as a test's) without importing torch."""
    return any(kind.__name__ == "OutOfMemoryError" for kind in type(exc).__mro__) and not isinstance(
        exc, OutOfMemoryError
    )


def _classify(exc: BaseException) -> BaseException:
    """Pipelines signal bad input with ValueError/TypeError; everything else is a bug or a device fault."""
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, InvalidInputError):
        return InvalidInputError(str(exc))
    return exc
