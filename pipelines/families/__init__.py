"""The pipeline families the step engine serves, each behind `StepFamily` (`base.py`), and how a signature is
matched to one. A family the engine does not know keeps request batching: the engine never stops a model
serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Conditioning, Start, StepFamily, StepInputs, Track, join_rows, scheduler_on, step_kwargs
from .flux import Flux
from .flux_kontext import FluxKontext
from .qwen_image import QwenImage
from .sd import StableDiffusion, StableDiffusionXL
from .sd3 import StableDiffusion3
from .z_image import ZImage

FAMILIES: tuple[StepFamily, ...] = (
    StableDiffusion(),
    StableDiffusionXL(),
    StableDiffusion3(),
    Flux(),
    FluxKontext(),
    QwenImage(),
    ZImage(),
)

__all__ = [
    "FAMILIES",
    "Conditioning",
    "Configs",
    "Start",
    "StepFamily",
    "StepInputs",
    "Track",
    "family_of",
    "join_rows",
    "scheduler_on",
    "step_capable",
    "step_kwargs",
]


def family_of(pipeline_class: type) -> StepFamily | None:
    """The family whose step path reproduces this class's `__call__` exactly, or None."""
    return next((family for family in FAMILIES if pipeline_class.__name__ in family.classes), None)


class Configs:
    """A stored pipeline's component configs, read without loading weights."""

    def __init__(self, folder: Any) -> None:
        self.folder = Path(folder)
        self.index = self._read("model_index.json")

    def __call__(self, component: str) -> dict[str, Any]:
        return self._read(component, "config.json")

    def component(self, name: str) -> str | None:
        """The class name model_index.json gives a component, or None."""
        entry = self.index.get(name)
        return str(entry[-1]) if isinstance(entry, list) and entry[-1] is not None else None

    def _read(self, *parts: str) -> dict[str, Any]:
        try:
            return dict(json.loads(Path(self.folder, *parts).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}


def step_capable(pipeline_class: type, task_class: type | None, folder: Any) -> bool:
    """Whether the step engine reproduces a signature exactly: the base and task classes are one family's, and
    the stored components are ones that family reproduces."""
    base = family_of(pipeline_class)
    if base is None or task_class is None or family_of(task_class) is not base:
        return False
    return base.capable(Configs(folder), base.classes[task_class.__name__])
