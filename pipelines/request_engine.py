"""Request batching: one whole pipeline call per batch, per-item inputs stacked, one generator per item.

Two kinds of call (`BatchKey.kind`):
- `TASK` (the typed RPCs): output `(images, nsfw_flags)`, split into one `ItemOutput` per item;
- `CALL` (a signature called by name): the method's outputs by name, split per item where an output is a
  per-item list, otherwise given whole to every item (`CallOutput`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batching import BatchKey, CallOutput, InvalidInputError, ItemOutput, StepHook, WorkItem, WorkKind
from batching.executor import is_out_of_memory
from model_store import interface

from .adapters import Adapter, ReplicaAdapters
from .device import Device
from .step_engine import NumericalError

log = logging.getLogger(__name__)
SCHEDULER_PARAM = "scheduler"
ADAPTERS, EMBEDDINGS = "adapters", "embeddings"  # BatchKey.group entries: the LoRAs and embeddings a call uses


class RequestEngine:
    """Runs request batches on one device's replicas of the served models (`model_store` runners)."""

    def __init__(self, models: Mapping[str, Any], device: Device, adapters: Mapping[str, ReplicaAdapters]) -> None:
        self.models = models
        self.device = device
        self.adapters = adapters
        self._schedulers: dict[tuple[int, str], Any] = {}

    def run(self, key: BatchKey, items: Sequence[WorkItem], on_step: StepHook) -> list[Any]:
        import torch

        signature = self.models[key.model].signatures[key.signature]
        is_call = key.kind is WorkKind.CALL
        group: dict[str, Any] = dict(key.group)
        loras: tuple[Adapter, ...] = group.get(ADAPTERS, ())
        adapters = self.adapters[key.model]
        adapters.ensure((*loras, *group.get(EMBEDDINGS, ())))
        adapters.apply(loras)  # every call sets them: the one before may have used others
        kwargs = key.kwargs()
        self._use_scheduler(signature.pipeline, kwargs.pop(SCHEDULER_PARAM, None))
        if key.batchable:
            for name in items[0].inputs:
                kwargs[name] = stack([item.inputs[name] for item in items], key.batch_dim)
        else:  # one item per call: its arguments go as they are, not as a batch of one
            kwargs.update(items[0].inputs)
        function = signature.function
        if interface.accepts(function, "generator"):
            # CPU generators: a seed gives the same starting noise on every device type. One per item, so an
            # image depends on its own seed only; a lone generic call gets a plain generator (its method may
            # make several images from it).
            generators = [torch.Generator("cpu").manual_seed(item.seed % 2**64) for item in items]
            kwargs["generator"] = generators[0] if is_call and len(items) == 1 else generators
        if interface.accepts(function, "callback_on_step_end"):
            kwargs["callback_on_step_end"] = _step_callback(on_step)
        with self.device.running():
            if is_call:
                return split_named(named_outputs(_call(function, kwargs, key)), len(items))
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


class CallRejected(InvalidInputError):
    """A Call's pipeline method failed on the arguments the client chose (INVALID_ARGUMENT, not a page)."""


def _call(function: Callable[..., Any], kwargs: dict[str, Any], key: BatchKey) -> Any:
    """A Call passes the client's own values into the method, past what validation can know of them: whatever
    the method raises about them is the client's error. Out-of-memory errors stay what they are."""
    try:
        return function(**kwargs)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        # The client's error, in one line: tracebacks are for our own bugs.
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        log.warning("%s.%s rejected a Call's arguments: %s: %s", key.model, key.signature, type(exc).__name__, first)
        # Our own errors speak to the client; a library's message stays in the log (never verbatim to clients).
        said = f": {str(exc).splitlines()[0][:200]}" if getattr(exc, "client_message", False) and str(exc) else ""
        raise CallRejected(f"{key.signature} failed on these arguments ({type(exc).__name__}{said})") from exc


def stack(values: Sequence[Any], batch_dim: int) -> Any:
    """Stack per-item values: tensors along batch_dim, anything else (str, PIL image, None) into a list."""
    first = values[0]
    if type(first).__module__.startswith("torch") and hasattr(first, "dim"):
        import torch

        return torch.cat(list(values), dim=batch_dim)
    return list(values)


def split_outputs(outputs: tuple[Any, ...], count: int) -> list[ItemOutput]:
    """Split `(images, nsfw_flags, ...)` into one ItemOutput per item (the executor checks the count)."""
    images = outputs[0]
    nsfw = outputs[1] if len(outputs) > 1 and isinstance(outputs[1], (list, tuple)) else None
    return [ItemOutput(image, bool(nsfw[i]) if nsfw and i < len(nsfw) else False) for i, image in enumerate(images)]


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


def named_outputs(result: Any) -> dict[str, Any]:
    """A method's outputs by name: a diffusers BaseOutput (an OrderedDict) by its fields, a tuple by position."""
    if isinstance(result, Mapping):
        return {str(k): v for k, v in result.items() if v is not None}
    if isinstance(result, tuple):
        return {f"output_{i}": v for i, v in enumerate(result)}
    return {"output": result}


def _step_callback(on_step: StepHook) -> Callable[..., dict[str, Any]]:
    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0)
        latents = tensors.get("latents")
        if step + 1 == total and latents is not None:  # once per call (a host sync): never decode garbage
            import torch

            if not bool(torch.isfinite(latents).all()):
                raise NumericalError("the model's latents became non-finite (NaN or inf) for this request")
        if not on_step(step + 1, total, latents):
            pipe._interrupt = True  # diffusers' documented way to stop a call at its next step
        return tensors

    return callback
