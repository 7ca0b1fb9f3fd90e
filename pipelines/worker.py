"""One executor worker's backend: its device's replica of every served model, and the engines that run on it.

Implements the executor's `Backend` (request batches: `RequestEngine`) and `StepBackend` (step-level batching:
`StepEngine`, for the models and tasks it supports).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from batching import BatchKey, StepHook, Tick, WorkItem, WorkKind

from .adapters import Adapter, Catalog, ReplicaAdapters
from .device import Device
from .request_engine import RequestEngine
from .step_engine import StepEngine

log = logging.getLogger(__name__)
WarmupWork = Callable[[], Sequence[Sequence[WorkItem]]]
"""Builds fresh warm-up batches (work items carry futures, so each worker needs its own)."""


class PipelineWorker:
    """The backend of one worker, over loaded diffusers pipelines (`model_store` runners by tag)."""

    def __init__(
        self,
        models: Mapping[str, Any],
        device: str,
        warmup_work: WarmupWork | None = None,
        adapters: Mapping[str, Sequence[Adapter]] | None = None,
        catalogs: Mapping[str, Catalog] | None = None,
    ) -> None:
        """`adapters` are loaded into each model's replica now and stay loaded while its `catalog` serves them;
        others load when first used."""
        self.device = Device(device)
        self.models = models
        self.adapters = {
            tag: ReplicaAdapters(runner.pipeline, (catalogs or {}).get(tag)) for tag, runner in models.items()
        }
        for tag, known in (adapters or {}).items():
            self.adapters[tag].ensure(known, skip_broken=True)
        self.request = RequestEngine(models, self.device, self.adapters)
        self.step = StepEngine(models, self.device, self.adapters)
        self._warmup_work = warmup_work

    def warmup(self) -> None:
        """Run each warm-up batch once through its engine, so the first request does not pay for lazy init.

        A pipeline that refuses its own defaults (the warm-up passes no size: PixArt's resolution binning
        refuses a tiny model's) still serves the calls it accepts: its warm-up failure is a warning. The step
        engine's is ours, and stops the start."""
        for items in self._warmup_work() if self._warmup_work else ():
            key = items[0].key
            if key.kind is not WorkKind.STEP:
                try:
                    self.run_batch(key, items, _keep_going)
                except Exception as exc:
                    log.warning(
                        "%s: the warm-up call of %s failed (%s: %.300s); serving it anyway, the first request "
                        "pays for lazy initialisation",
                        key.model,
                        key.signature,
                        type(exc).__name__,
                        exc,
                    )
                continue
            self.step.join(items)
            failed = []
            while self.step.busy:
                failed += self.step.tick().failed
            if failed:
                raise RuntimeError(f"step warm-up of {key.model} failed: {failed[0][1]!r}") from failed[0][1]

    # --- request batches -------------------------------------------------------------------------------------

    def run_batch(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> Sequence[Any]:
        return self.request.run(key, items, on_step)

    # --- step work -------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.step.busy

    def step_load(self, key: BatchKey) -> tuple[Hashable, int, int]:
        return self.step.load(key)

    def join(self, key: BatchKey, items: Sequence[WorkItem]) -> None:
        self.step.join(items)

    def tick(self) -> Tick:
        return self.step.tick()

    def abandon(self) -> list[WorkItem]:
        return self.step.abandon()


def _keep_going(step: int, total: int, latents: Any = None) -> bool:
    return True
