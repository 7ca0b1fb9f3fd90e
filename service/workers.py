"""Builds the executor's workers: which devices, each worker's own replica of every served model
(`pipelines.PipelineWorker`), and the warm-up each runs before the server reports ready."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence

from PIL import Image

from batching import BackendFactory, BatchReport, Executor, WorkItem
from model_store.interface import EDIT, IMG2IMG, INPAINT, TEXT2IMG
from pipelines.worker import PipelineWorker, WarmupWork

from . import validation
from .config import ServerConfig
from .domain import Params, TaskRequest
from .registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)
# Loading is serialised: diffusers/accelerate build modules on the meta device through process-wide patches,
# so two threads loading at once corrupt each other ("Cannot copy out of meta tensor").
_LOAD_LOCK = threading.Lock()
PRELOAD_ADAPTERS = 16


def resolve_devices(spec: str) -> list[str]:
    """`auto` is every visible GPU, else the CPU; `cuda` is every GPU; or an explicit comma list."""
    spec = spec.strip().lower()
    if spec in ("auto", "cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count:
            return [f"cuda:{i}" for i in range(count)]
        if spec == "cuda":
            raise ValueError("--device cuda was given but no CUDA device is visible")
        return ["cpu"]
    devices = [part.strip() for part in spec.split(",") if part.strip()]
    for device in devices:
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N[,cuda:M]")
    return devices or ["cpu"]


def warmup_requests(registry: ModelRegistry) -> list[TaskRequest]:
    """One single-step request per typed task each model serves, with the inputs the task needs (an image, a
    mask, a reference image) at the model's default size, and no size of its own: the pipeline picks its own
    default, a value it accepts. Custom signatures are not warmed: nobody knows what they take."""
    requests = []
    for served in registry.models:
        width, height = served.defaults.width, served.defaults.height
        width, height = max(8, width // 8 * 8), max(8, height // 8 * 8)  # an input image validation accepts
        tasks = {s.task for s in served.model.signatures.values()} & {TEXT2IMG, IMG2IMG, INPAINT, EDIT}
        gray = _png(Image.new("RGB", (width, height), (128, 128, 128)))
        controls = (gray,) * served.control_inputs
        for task in sorted(tasks):
            image = gray if task in (IMG2IMG, INPAINT) else None
            mask = _png(Image.new("L", (width, height), 255)) if task == INPAINT else None
            strength = 1.0 if image is not None else None
            requests.append(
                TaskRequest(
                    task,
                    served.tag,
                    "warm-up",
                    params=Params(steps=1, seed=0),
                    image=image,
                    mask_image=mask,
                    strength=strength,
                    control_images=controls,
                    images=(gray,) if task == EDIT else (),
                )
            )
    return requests


def warmup_work(registry: ModelRegistry, limits: validation.Limits) -> WarmupWork:
    """Fresh warm-up batches for each worker, built through validation like any request."""
    requests = warmup_requests(registry)

    def build() -> list[list[WorkItem]]:
        return [validation.generation(request, registry, limits).work_items(None) for request in requests]

    return build


def backend_factory(served: Sequence[ServedModel], device: str, warmup: WarmupWork | None = None) -> BackendFactory:
    """Loads this worker's own replica of every model on `device` (called inside the worker thread)."""

    def build() -> PipelineWorker:
        models = {}
        for model in served:
            log.info("loading %s on %s", model.tag, device)
            with _LOAD_LOCK:
                models[model.tag] = model.model.to_runner(device)
        # The first PRELOAD_ADAPTERS of each model load now (no first request waits for them); the rest on first
        # use: diffusers' LoRA loading grows with the adapters already loaded, so preloading hundreds would make
        # start-up quadratic (100 adapters took 73 s).
        adapters = {model.tag: model.adapters.all()[:PRELOAD_ADAPTERS] for model in served}
        catalogs = {model.tag: model.adapters.snapshot for model in served}
        return PipelineWorker(models, device, warmup, adapters, catalogs)

    return build


Factory = Callable[[Sequence[ServedModel], str, WarmupWork | None], BackendFactory]


def build_executor(
    config: ServerConfig,
    registry: ModelRegistry,
    devices: Sequence[str],
    on_batch: Callable[[BatchReport], None] | None = None,
    factory: Factory = backend_factory,
) -> Executor:
    warmup = warmup_work(registry, validation.Limits.of(config))
    workers = [
        (f"{device}#{replica}", factory(registry.models, device, warmup))
        for device in devices
        for replica in range(config.workers_per_device)
    ]
    return Executor(
        workers,
        max_batch_size=config.max_batch_size,
        max_queue=config.max_queue,
        max_queue_per_client=config.max_queue_per_client,
        max_wait=config.max_wait_ms / 1000.0,
        on_batch=on_batch,
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
