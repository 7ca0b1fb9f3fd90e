"""The BatchRunner for diffusers pipelines: stacks per-item inputs, one generator per item, splits outputs.

Imports torch lazily and knows nothing of gRPC. `runners` maps a model tag to a loaded runner whose
`signatures[name]` expose `.pipeline`, `.function` and `.run(**kwargs) -> tuple` (model_store.runner).

Two kinds of call:
- task calls (the typed RPCs): output `(images, nsfw_flags)`, split into one `ItemOutput` per item;
- generic calls (`BatchKey.group` holds `("call", True)`): the method's outputs by name, split per item where an
  output is a per-item list, otherwise given whole to every item (`CallOutput`).
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
CALL_GROUP = ("call", True)


@dataclass(frozen=True)
class ItemOutput:
    """One item's share of a task call's output."""

    image: Any  # a PIL image (or an array, per output_type)
    nsfw: bool = False


@dataclass(frozen=True)
class CallOutput:
    """One item's share of a generic call's outputs, by name (`output_0`... when the method returns a tuple)."""

    values: Mapping[str, Any]


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
            self.run_batch(key, items, lambda step, total, latents: True)

    def run_batch(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> Sequence[Any]:
        import torch

        signature = self.runners[key.model].signatures[key.signature]
        is_call = CALL_GROUP in key.group
        kwargs = key.kwargs()
        scheduler_name = kwargs.pop(SCHEDULER_PARAM, None)
        self._use_scheduler(signature.pipeline, scheduler_name)
        if key.batchable:
            for name in items[0].inputs:
                kwargs[name] = stack([item.inputs[name] for item in items], key.batch_dim)
        else:  # one item per call: its arguments go as they are, not as a batch of one
            kwargs.update(items[0].inputs)
        params = _parameters(signature.function)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if "generator" in params or accepts_any:
            # CPU generators: a seed gives the same starting noise on every device type. One per item, so an
            # image depends on its own seed only; a lone generic call gets a plain generator (its method may
            # make several images from it).
            generators = [torch.Generator("cpu").manual_seed(item.seed % 2**64) for item in items]
            kwargs["generator"] = generators[0] if is_call and len(items) == 1 else generators
        if "callback_on_step_end" in params or accepts_any:
            kwargs["callback_on_step_end"] = _step_callback(on_step)
        with torch.inference_mode(), self._stream_context():
            if is_call:
                return split_named(_named_outputs(signature.function(**kwargs)), len(items))
            outputs = signature.run(**kwargs)
        return split_outputs(outputs, len(items))

    def _use_scheduler(self, pipeline: Any, name: str | None) -> None:
        """Put this worker's own instance of the named scheduler (or the model's own) on the pipeline."""
        base_key = (id(pipeline), "")
        if base_key not in self._schedulers:
            self._schedulers[base_key] = pipeline.scheduler
        if not name:
            pipeline.scheduler = self._schedulers[base_key]
            return
        cache_key = (id(pipeline), name)
        if cache_key not in self._schedulers:
            import diffusers

            base = self._schedulers[base_key]
            self._schedulers[cache_key] = getattr(diffusers, name).from_config(base.config)
        pipeline.scheduler = self._schedulers[cache_key]

    def _stream_context(self) -> Any:
        """The worker's own CUDA stream, so replicas sharing a GPU overlap; a no-op on the CPU."""
        if not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return _synchronized_stream(self._stream)


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


def split_named(values: Mapping[str, Any], count: int) -> list[CallOutput]:
    """Give each item its element of per-item outputs (lists as long as the batch), and every other output whole."""
    if count == 1:
        return [CallOutput(dict(values))]
    per_item: list[dict[str, Any]] = [{} for _ in range(count)]
    for name, value in values.items():
        split = isinstance(value, (list, tuple)) and len(value) == count
        for index in range(count):
            per_item[index][name] = [value[index]] if split else value
    return [CallOutput(v) for v in per_item]


def _named_outputs(result: Any) -> dict[str, Any]:
    if isinstance(result, Mapping):  # diffusers BaseOutput is an OrderedDict
        return {str(k): v for k, v in result.items() if v is not None}
    if isinstance(result, tuple):
        return {f"output_{i}": v for i, v in enumerate(result)}
    return {"output": result}


def _step_callback(on_step: StepHook) -> Callable[..., dict[str, Any]]:
    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0)
        if not on_step(step + 1, total, tensors.get("latents")):
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
