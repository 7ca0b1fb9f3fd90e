"""The BatchRunner for diffusers pipelines: stacks per-item inputs, one generator per item, splits outputs.

Imports torch lazily and knows nothing of gRPC. `runners` maps a model tag to a loaded runner whose
`signatures[name]` expose `.pipeline`, `.function` and `.run(**kwargs) -> tuple` (model_store.runner).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .executor import StepHook
from .items import BatchKey, WorkItem

SCHEDULER_PARAM = "scheduler"


@dataclass(frozen=True)
class ItemOutput:
    """One item's share of a pipeline call's output."""

    image: Any  # a PIL image (or an array, per output_type)
    nsfw: bool = False
    extra: tuple[Any, ...] = ()  # other per-call outputs (for signatures that return more than images)


class DiffusersBatchRunner:
    """Runs batches on one device's replicas of the served models."""

    def __init__(
        self,
        runners: Mapping[str, Any],
        device: str,
        warmup: Sequence[tuple[BatchKey, Sequence[WorkItem]]] = (),
    ) -> None:
        self.runners = runners
        self.device = device
        self._warmup = warmup
        self._schedulers: dict[tuple[int, str], Any] = {}
        self._stream: Any = None

    def warmup(self) -> None:
        for key, items in self._warmup:
            self.run_batch(key, items, lambda step, total: True)

    def run_batch(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> Sequence[ItemOutput]:
        import torch

        signature = self.runners[key.model].signatures[key.signature]
        pipeline = signature.pipeline
        kwargs = key.kwargs()
        scheduler_name = kwargs.pop(SCHEDULER_PARAM, None)
        if scheduler_name:
            self._use_scheduler(pipeline, scheduler_name)
        for name in items[0].inputs:
            kwargs[name] = stack([item.inputs[name] for item in items], key.batch_dim)
        # CPU generators: a seed gives the same starting noise on every device type.
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(item.seed % 2**64) for item in items]
        params = _parameters(signature.function)
        if "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = _step_callback(on_step)
        with torch.inference_mode(), self._stream_context():
            outputs = signature.run(**kwargs)
        return split_outputs(outputs, len(items))

    def _stream_context(self) -> Any:
        """The worker's own CUDA stream, so replicas sharing a GPU overlap; a no-op on the CPU."""
        if not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return _synchronized_stream(self._stream)

    def _use_scheduler(self, pipeline: Any, name: str) -> None:
        """Swap in this worker's own instance of the named scheduler (one per pipeline and name)."""
        import diffusers

        base_key = (id(pipeline), "")
        if base_key not in self._schedulers:
            self._schedulers[base_key] = pipeline.scheduler
        cache_key = (id(pipeline), name)
        if cache_key not in self._schedulers:
            base = self._schedulers[base_key]
            self._schedulers[cache_key] = getattr(diffusers, name).from_config(base.config)
        pipeline.scheduler = self._schedulers[cache_key]


def stack(values: Sequence[Any], batch_dim: int) -> Any:
    """Stack per-item values: tensors along batch_dim, anything else (str, PIL image, None) into a list."""
    first = values[0]
    if type(first).__module__.startswith("torch") and hasattr(first, "dim"):
        import torch

        return torch.cat(list(values), dim=batch_dim)
    return list(values)


def split_outputs(outputs: tuple[Any, ...], count: int) -> list[ItemOutput]:
    """Split `(images, nsfw_flags, ...)` into one ItemOutput per item."""
    images = outputs[0]
    if len(images) != count:
        raise RuntimeError(f"pipeline returned {len(images)} images for {count} items")
    nsfw = outputs[1] if len(outputs) > 1 and isinstance(outputs[1], (list, tuple)) else None
    return [ItemOutput(images[i], bool(nsfw[i]) if nsfw else False) for i in range(count)]


def _step_callback(on_step: StepHook) -> Callable[..., dict[str, Any]]:
    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0)
        if not on_step(step + 1, total):
            pipe._interrupt = True  # diffusers skips the remaining steps
        return tensors

    return callback


def _parameters(function: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}


@contextlib.contextmanager
def _synchronized_stream(stream: Any) -> Iterator[None]:
    import torch

    with torch.cuda.stream(stream):
        yield
    stream.synchronize()  # outputs are read on another thread: make them final first
