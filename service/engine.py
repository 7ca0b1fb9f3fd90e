"""Wires the served models to the batching executor: devices, per-worker replicas and warm-up."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from batching import BatchKey, BatchReport, Executor, WorkItem
from batching.diffusers_runner import DiffusersBatchRunner
from batching.executor import RunnerFactory

from .config import ServerConfig
from .registry import ServedModel

log = logging.getLogger(__name__)
TEST_LOAD_DELAY_ENV = "DIFFUSERS_GRPC_TEST_LOAD_DELAY_S"
# Loading is serialised: diffusers/accelerate build modules on the meta device through process-wide patches,
# so two threads loading at once corrupt each other ("Cannot copy out of meta tensor").
_LOAD_LOCK = threading.Lock()


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


def warmup_batches(served: Sequence[ServedModel]) -> list[tuple[BatchKey, list[WorkItem]]]:
    """One single-step call per batchable text2img signature, at the default size, before readiness."""
    batches = []
    for model in served:
        for signature in model.model.signatures.values():
            if signature.task != "text2img":
                continue
            key = BatchKey.build(
                model.tag,
                signature.name,
                {
                    "height": model.defaults.height,
                    "width": model.defaults.width,
                    "num_inference_steps": 1,
                    "output_type": "pil",
                },
                batchable=signature.batchable,
                batch_dim=signature.batch_dim,
            )
            batches.append((key, [WorkItem(key, {"prompt": "warm-up", "negative_prompt": ""}, seed=0)]))
            break
    return batches


def runner_factory(served: Sequence[ServedModel], device: str) -> RunnerFactory:
    """Loads this worker's own replica of every model on `device` (run inside the worker thread)."""

    def build() -> DiffusersBatchRunner:
        delay = float(os.environ.get(TEST_LOAD_DELAY_ENV) or 0)
        if delay:  # test hook: a slow model load, to watch readiness from outside the process
            time.sleep(delay)
        runners = {}
        for model in served:
            log.info("loading %s on %s", model.tag, device)
            with _LOAD_LOCK:
                runners[model.tag] = model.model.to_runner(device)
        return DiffusersBatchRunner(runners, device, warmup_batches(served))

    return build


def build_executor(
    config: ServerConfig,
    served: Sequence[ServedModel],
    on_batch: Callable[[BatchReport], None] | None = None,
    factory: Callable[[Sequence[ServedModel], str], RunnerFactory] = runner_factory,
) -> Executor:
    devices = resolve_devices(config.device)
    workers = [
        (f"{device}#{replica}", factory(served, device))
        for device in devices
        for replica in range(config.workers_per_device)
    ]
    return Executor(
        workers,
        max_batch_size=config.max_batch_size,
        max_queue=config.max_queue,
        max_wait=config.max_wait_ms / 1000.0,
        on_batch=on_batch,
    )
