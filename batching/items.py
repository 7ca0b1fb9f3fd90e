"""Work items and batch keys: the unit the executor queues, groups and runs."""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class WorkKind(enum.Enum):
    """What kind of work a batch is: how the worker's backend runs it, and what each item's result is."""

    TASK = "task"  # a typed task (text2img, img2img, inpaint): one pipeline call per batch, an ItemOutput each
    CALL = "call"  # a generic Call of a signature by name: one call per batch, a CallOutput each
    STEP = "step"  # a typed task run by the step engine: items join and leave at denoising steps, ItemOutputs


@dataclass(frozen=True)
class StepEvent:
    """Progress of one item, reported from the worker thread after each denoising step."""

    step: int  # 1-based
    total: int
    elapsed: float  # seconds since the item's call started (queue time excluded)
    latents: Any = None  # this item's latents after the step, when the pipeline exposes them; read, never keep


ProgressCallback = Callable[[StepEvent], None]
"""Called from a worker thread: must be quick and must not keep `latents` (they change at the next step)."""


@dataclass(frozen=True)
class BatchKey:
    """Items with equal keys may run in one pipeline call.

    `kind` says how the batch runs. `params` holds every argument the pipeline takes as one value for the whole
    call (size, steps, guidance, scheduler...), as sorted (name, value) pairs so the key is hashable. `group`
    holds values that must also match but are not call arguments (the input image size: diffusers would
    silently resize mismatched inputs).
    """

    model: str
    signature: str
    kind: WorkKind = WorkKind.TASK
    params: tuple[tuple[str, Hashable], ...] = ()
    batchable: bool = True
    batch_dim: int = 0
    group: tuple[tuple[str, Hashable], ...] = ()

    @classmethod
    def build(
        cls,
        model: str,
        signature: str,
        params: Mapping[str, Hashable],
        *,
        kind: WorkKind = WorkKind.TASK,
        batchable: bool = True,
        batch_dim: int = 0,
        group: Mapping[str, Hashable] | None = None,
    ) -> BatchKey:
        return cls(
            model,
            signature,
            kind,
            tuple(sorted(params.items())),
            batchable,
            batch_dim,
            tuple(sorted((group or {}).items())),
        )

    def kwargs(self) -> dict[str, Any]:
        """The call arguments, with `Frozen` values turned back into lists and dicts."""
        return {name: value.value if isinstance(value, Frozen) else value for name, value in self.params}


@dataclass(frozen=True)
class Frozen:
    """A JSON-like list or dict held hashably (as canonical JSON) inside a batch key."""

    text: str

    @classmethod
    def of(cls, value: Any) -> Frozen:
        return cls(json.dumps(value, sort_keys=True, separators=(",", ":")))

    @property
    def value(self) -> Any:
        return json.loads(self.text)


@dataclass
class ItemTrace:
    """What happened to an item, filled in by its worker: for request logs and metrics.

    `started` and `finished` are the executor clock's times of the item's (last) run, so a request's run time
    is the span of its items' runs, not their sum.
    """

    queue_wait: float = 0.0  # seconds
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0
    # (start, end, rows, items) of each step-engine tick it took part in, on the engine's clock, when its request
    # is traced; None (nothing recorded, no cost) otherwise.
    ticks: list[tuple[float, float, int, int]] | None = None

    @property
    def run_seconds(self) -> float:
        return max(0.0, self.finished - self.started)


@dataclass(frozen=True, eq=False)
class WorkItem:
    """One image to make. `inputs` are the per-item arguments stacked along the batch dimension."""

    key: BatchKey
    inputs: Mapping[str, Any]
    seed: int
    deadline: float | None = None  # in the executor clock's time (time.monotonic by default)
    on_progress: ProgressCallback | None = None
    client: str = ""  # who asked (an identity, an address): the queue gives each client its share
    cost: int = 1  # images it makes: what it takes of the queue (a Call with a list of prompts makes several)
    steps: int = 0  # denoising steps it runs (step work), for admission by deadline; 0 when not known
    future: Future[Any] = field(default_factory=Future)
    trace: ItemTrace = field(default_factory=ItemTrace, repr=False)
    _cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask for the item not to run; a running batch whose items are all cancelled is interrupted."""
        self._cancel_requested.set()
        self.future.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()


def set_result(future: Future[Any], value: Any) -> None:
    """Set a future's result unless it is already done (cancelled, or failed by another path)."""
    if not future.done():
        try:
            future.set_result(value)
        except Exception:  # lost a race with cancel(): the caller has gone, nothing to report
            pass


def set_exception(future: Future[Any], error: BaseException) -> None:
    """Fail a future unless it is already done."""
    if not future.done():
        try:
            future.set_exception(error)
        except Exception:
            pass
