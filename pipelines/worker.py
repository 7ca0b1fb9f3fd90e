"""One executor worker's backend: its device's replica of every served model, and the engines that run on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batching import BatchKey, StepHook, WorkItem

from .device import Device
from .request_engine import RequestEngine

WarmupWork = Callable[[], Sequence[Sequence[WorkItem]]]
"""Builds fresh warm-up batches (work items carry futures, so each worker needs its own)."""


class PipelineWorker:
    """Implements the executor's `Backend` for loaded diffusers pipelines (`model_store` runners by tag)."""

    def __init__(self, models: Mapping[str, Any], device: str, warmup_work: WarmupWork | None = None) -> None:
        self.device = Device(device)
        self.models = models
        self.request = RequestEngine(models, self.device)
        self._warmup_work = warmup_work

    def warmup(self) -> None:
        """Run each warm-up batch once, so the first request does not pay for lazy initialisation."""
        for items in self._warmup_work() if self._warmup_work else ():
            self.run_batch(items[0].key, items, _keep_going)

    def run_batch(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> Sequence[Any]:
        return self.request.run(key, items, on_step)


def _keep_going(step: int, total: int, latents: Any = None) -> bool:
    return True
