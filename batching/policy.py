"""When a free worker should hold a partial batch a little longer, and how big a batch may be.

The policy learns, per batch key, two things online:
- the cost of a call as a function of batch size, `t(b) = fixed + per_item * b`, fitted by least squares over
  the most recent calls (exponentially forgotten, so it follows the device's warm-up and load);
- the arrival rate of items, an exponentially weighted mean of inter-arrival gaps.

A partial group of `n` items is held (at most `max_wait` after its oldest item arrived) only when waiting pays:
- enough is known (calls at two or more batch sizes were seen), and
- batching is worth something for this key (the fixed cost of a call is larger than the cost of one more item), and
- at least one more item is expected before the wait ends (`rate * remaining_wait >= 1`).
So at low load a lone request is never held, and under load the wait lasts only until the batch is expected to
fill. Out-of-memory errors lower the key's batch limit for a cool-down period.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass

FORGET = 0.9  # weight kept by past observations at each new one
PAYING_ROWS = 9.0  # a tick may hold up to PAYING_ROWS * fixed / per_row rows: the last doubling still pays 10%
# ...but never fewer than this: where batching no longer pays (a compute-bound model: tiny SD3 at 32x32), sharing
# a tick still costs no throughput (rows cost the same together or apart) and lets a short request run beside a
# long one instead of waiting for it (at 2 rows a 4-step request waited out an 80-step one: 13x its latency).
MIN_SHARED_ROWS = 8
RATE_WEIGHT = 0.2  # weight of the newest inter-arrival gap
OOM_COOLDOWN = 60.0  # seconds a lowered batch limit holds
MAX_TICK_SECONDS = 1.0  # a step-engine tick may hold only the rows the cost model says run within this


@dataclass
class _CostFit:
    """Exponentially forgotten sums for a least-squares line t = fixed + per_item * b."""

    w: float = 0.0
    sb: float = 0.0
    st: float = 0.0
    sbb: float = 0.0
    sbt: float = 0.0
    sizes: frozenset[int] = frozenset()

    def add(self, size: int, seconds: float) -> None:
        self.w = self.w * FORGET + 1.0
        self.sb = self.sb * FORGET + size
        self.st = self.st * FORGET + seconds
        self.sbb = self.sbb * FORGET + size * size
        self.sbt = self.sbt * FORGET + size * seconds
        self.sizes = self.sizes | {size}

    def line(self) -> tuple[float, float] | None:
        """(fixed, per_item), or None until two batch sizes have been seen."""
        if len(self.sizes) < 2:
            return None
        denominator = self.w * self.sbb - self.sb * self.sb
        if denominator <= 1e-12:
            return None
        per_item = (self.w * self.sbt - self.sb * self.st) / denominator
        fixed = (self.st - per_item * self.sb) / self.w
        return max(fixed, 0.0), max(per_item, 0.0)


@dataclass
class _Arrivals:
    last: float | None = None
    gap: float | None = None  # smoothed seconds between items

    def add(self, now: float, count: int) -> None:
        if self.last is not None:
            gap = (now - self.last) / count
            self.gap = gap if self.gap is None else (1 - RATE_WEIGHT) * self.gap + RATE_WEIGHT * gap
        self.last = now

    def rate(self) -> float:
        return 0.0 if not self.gap else 1.0 / self.gap


class BatchPolicy:
    """Thread-safe: the queue calls `arrived`/`wait_until`, workers call `observe`/`out_of_memory`."""

    def __init__(self, max_batch_size: int, max_wait: float, max_tick_seconds: float = MAX_TICK_SECONDS) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_tick_seconds = max_tick_seconds
        self._lock = threading.Lock()
        self._costs: dict[Hashable, _CostFit] = {}
        self._arrivals: dict[Hashable, _Arrivals] = {}
        self._limits: dict[Hashable, tuple[int, float]] = {}  # key -> (lowered limit, until)

    def arrived(self, key: Hashable, now: float, count: int = 1) -> None:
        with self._lock:
            self._arrivals.setdefault(key, _Arrivals()).add(now, count)

    def observe(self, key: Hashable, size: int, seconds: float) -> None:
        """A call of `size` items took `seconds`."""
        with self._lock:
            self._costs.setdefault(key, _CostFit()).add(size, seconds)

    def estimate(self, key: Hashable, size: int) -> float | None:
        """Expected seconds of a call of `size` items, once known."""
        with self._lock:
            fit = self._costs.get(key)
            line = fit.line() if fit else None
        return None if line is None else line[0] + line[1] * size

    def limit(self, key: Hashable, now: float) -> int:
        """The batch size a worker may take for this key now (lowered for a while after an out-of-memory)."""
        with self._lock:
            lowered = self._limits.get(key)
            if lowered is not None and now < lowered[1]:
                return lowered[0]
            return self.max_batch_size

    def out_of_memory(self, key: Hashable, size: int, now: float) -> None:
        with self._lock:
            self._limits[key] = (max(1, size // 2), now + OOM_COOLDOWN)

    def row_budget(self, group: Hashable, now: float) -> int:
        """How many rows one step-engine tick of `group` may hold.

        At most two per item of `max_batch_size` (classifier-free guidance), fewer for a while after an
        out-of-memory, and fewer where the learned tick cost says more rows no longer pay: with t(r) = fixed +
        per_row * r, doubling the rows to r still gains >= 10% throughput only while r <= 9 * fixed / per_row
        (but at least MIN_SHARED_ROWS, so items still join a running set).
        Nor more than a tick of `max_tick_seconds` holds (one item always fits): a set of huge images cannot keep
        the worker from the other sets for long, since sets take turns tick by tick.
        """
        budget = 2 * self.max_batch_size
        with self._lock:
            lowered = self._limits.get(group)
            fit = self._costs.get(group)
            line = fit.line() if fit else None
        if lowered is not None and now < lowered[1]:
            budget = min(budget, lowered[0])
        if line is not None and line[1] > 0:
            budget = min(budget, max(MIN_SHARED_ROWS, int(PAYING_ROWS * line[0] / line[1])))
            # One set's tick must not hold the worker long: other sets (small requests) tick in between.
            budget = min(budget, max(2, int((self.max_tick_seconds - line[0]) / line[1])))
        return budget

    def wait_until(
        self, key: Hashable, queued: int, oldest_arrival: float, now: float, room: int | None = None
    ) -> float | None:
        """The time until which a worker should hold a group of `queued` items, or None to take it now."""
        limit = self.limit(key, now) if room is None else min(room, self.limit(key, now))
        if self.max_wait <= 0 or queued >= limit:
            return None
        deadline = oldest_arrival + self.max_wait
        if now >= deadline:
            return None
        with self._lock:
            fit = self._costs.get(key)
            line = fit.line() if fit else None
            arrivals = self._arrivals.get(key)
            rate = arrivals.rate() if arrivals else 0.0
        if line is None:
            return None  # no evidence yet that waiting pays: never add latency on a guess
        fixed, per_item = line
        if fixed <= per_item or rate * (deadline - now) < 1.0:
            return None  # batching gains little here, or nobody is expected before the wait would end
        fill = now + (limit - queued) / rate
        return min(deadline, fill)
