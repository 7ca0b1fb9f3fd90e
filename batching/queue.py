"""The bounded batch queue: one FIFO per batch key, taken oldest-group-first by free workers."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .errors import DeadlineExceededError, ItemCancelledError, QueueFullError, WorkerUnavailableError
from .items import BatchKey, WorkItem, WorkKind, set_exception
from .policy import BatchPolicy

Clock = Callable[[], float]


@dataclass(frozen=True)
class _Entry:
    item: WorkItem
    arrived: float


@dataclass(frozen=True)
class Batch:
    """Items taken together, with the time each waited in the queue."""

    key: BatchKey
    items: Sequence[WorkItem]
    queue_wait: Sequence[float]


class BatchQueue:
    """Holds items until a worker takes them. Thread-safe; workers block on a condition, never poll.

    Capacity counts images (`WorkItem.cost`), not requests. Each client (`WorkItem.client`) has a share,
    `max_per_client` (default a quarter of the queue): beyond it, a client that already has items queued is taken
    only while no other client is waiting and the queue keeps a share free, so one client's flood never locks
    another out. Within a group, workers take items round-robin across clients, so a client's backlog never
    delays another's first image.
    """

    def __init__(
        self,
        max_items: int,
        clock: Clock = time.monotonic,
        policy: BatchPolicy | None = None,
        max_per_client: int | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self.max_per_client = max_per_client if max_per_client is not None else max(1, max_items // 4)
        self._clock = clock
        self.policy = policy
        self._groups: OrderedDict[BatchKey, deque[_Entry]] = OrderedDict()
        self._size = 0
        self._by_client: Counter[str] = Counter()  # queued cost per client
        self._last_turn: dict[str, int] = {}  # when each client with queued items was last served
        self._turns = itertools.count()
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def put(self, items: Sequence[WorkItem]) -> None:
        """Enqueue all items or none: a request is never half-queued."""
        with self._cond:
            if self._closed:
                raise WorkerUnavailableError("the executor is not accepting work (shutting down or no live worker)")
            cost = sum(item.cost for item in items)
            if self._size + cost > self.max_items:
                raise QueueFullError(
                    f"queue full: {self._size} images waiting, limit {self.max_items}, request needs {cost}"
                )
            client = items[0].client if items else ""
            held = self._by_client[client]
            if held and held + cost > self.max_per_client:  # a client with nothing queued may use what is free
                others_wait = self._size - held > 0
                if others_wait or self._size + cost > self.max_items - self.max_per_client:
                    raise QueueFullError(
                        f"queue full for this client: it has {held} images waiting, its share is "
                        f"{self.max_per_client} while others wait, request needs {cost}"
                    )
            now = self._clock()
            for item in items:
                self._groups.setdefault(item.key, deque()).append(_Entry(item, now))
                self._by_client[item.client] += item.cost
            self._size += cost
            if self.policy is not None and items:
                self.policy.arrived(items[0].key, now, len(items))
            self._cond.notify(len(items))

    def take(self, room: Callable[[BatchKey], int], *, block: bool = True) -> Batch | None:
        """Take the head of the oldest group that has room, up to `room(key)` items.

        Blocks until work can be taken, unless `block` is False (a worker with denoising in progress must not
        wait). Cancelled and expired items are dropped (expired ones failed) on the way. Returns None when nothing
        can be taken without blocking, or once the queue is closed and empty.
        """
        with self._cond:
            while True:
                now = self._clock()
                self._drop_dead(now)
                ready = sorted((entries[0].arrived, i, key) for i, (key, entries) in enumerate(self._groups.items()))
                for _, _, key in ready:  # oldest first: no starvation across keys
                    limit = room(key)
                    if limit <= 0:
                        continue  # the worker has no room for this kind of work now; look at the next group
                    hold = self._hold_until(key, limit, now)
                    if hold is None:
                        return self._pop(key, limit, now)
                    if not block:
                        return None
                    self._cond.wait(timeout=hold - now)  # new items or the end of the wait wake us
                    break
                else:
                    if not block or (self._closed and not self._groups):
                        return None
                    self._cond.wait()

    def close(self) -> None:
        """Refuse new items; workers drain what is queued, then `take` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def put_back(self, items: Sequence[WorkItem]) -> None:
        """Return items that had started (evicted from a running batch) to the queue, ahead of later arrivals.

        They were admitted once, so the size limit does not apply; they keep their place by first arrival.
        """
        with self._cond:
            for item in items:
                arrived = item.trace.started - item.trace.queue_wait
                entries = [*self._groups.get(item.key, ()), _Entry(item, arrived)]
                self._groups[item.key] = deque(sorted(entries, key=lambda e: e.arrived))
                self._by_client[item.client] += item.cost
            self._size += sum(item.cost for item in items)
            self._cond.notify(len(items))

    def fail_all(self, error: BaseException) -> int:
        """Fail every queued item (for a forced shutdown or when no worker is left). Returns how many."""
        with self._cond:
            failed = 0
            for entries in self._groups.values():
                for entry in entries:
                    set_exception(entry.item.future, error)
                    failed += 1
            self._groups.clear()
            self._by_client.clear()
            self._last_turn.clear()
            self._size = 0
            return failed

    def _hold_until(self, key: BatchKey, limit: int, now: float) -> float | None:
        """When the policy says a partial group should wait for company (never once closed: drain fast; never
        for step work, which joins a running batch at its next step anyway)."""
        if self.policy is None or self._closed or not key.batchable or key.kind is WorkKind.STEP:
            return None
        entries = self._groups[key]
        return self.policy.wait_until(key, len(entries), entries[0].arrived, now, limit)

    def _pop(self, key: BatchKey, limit: int, now: float) -> Batch:
        """Up to `limit` items of the group, round-robin across its clients (the one served longest ago first,
        across takes too), each client's items in arrival order."""
        entries = self._groups[key]
        if len({entry.item.client for entry in entries}) == 1:
            taken = [entries.popleft() for _ in range(min(limit, len(entries)))]
            self._last_turn[taken[0].item.client] = next(self._turns)
        else:
            by_client: dict[str, deque[_Entry]] = {}
            for entry in entries:
                by_client.setdefault(entry.item.client, deque()).append(entry)
            taken = []
            while len(taken) < limit and by_client:
                client = min(by_client, key=lambda c: self._last_turn.get(c, -1))  # ties: the oldest item first
                taken.append(by_client[client].popleft())
                self._last_turn[client] = next(self._turns)
                if not by_client[client]:
                    del by_client[client]
            chosen = {id(entry) for entry in taken}
            self._groups[key] = entries = deque(entry for entry in entries if id(entry) not in chosen)
        if not entries:
            del self._groups[key]
        self._forget(entry.item for entry in taken)
        return Batch(key, [e.item for e in taken], [now - e.arrived for e in taken])

    def _forget(self, items: Iterable[WorkItem]) -> None:
        for item in items:
            self._size -= item.cost
            self._by_client[item.client] -= item.cost
            if self._by_client[item.client] <= 0:  # nothing queued: it has no turn to wait for
                del self._by_client[item.client]
                self._last_turn.pop(item.client, None)

    def _drop_dead(self, now: float) -> None:
        for key in list(self._groups):
            entries = self._groups[key]
            alive: deque[_Entry] = deque()
            for entry in entries:
                if _dead(entry.item, now):
                    self._forget((entry.item,))
                else:
                    alive.append(entry)
            if alive:
                self._groups[key] = alive
            else:
                del self._groups[key]


def _dead(item: WorkItem, now: float) -> bool:
    if item.cancel_requested or item.future.cancelled():
        set_exception(item.future, ItemCancelledError("cancelled while queued"))  # an evicted item's future runs
        return True
    if item.deadline is not None and now >= item.deadline:
        set_exception(item.future, DeadlineExceededError("deadline passed while the item was queued"))
        return True
    return False
