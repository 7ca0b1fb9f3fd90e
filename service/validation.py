"""Request validation: proto request -> `Generation`, or INVALID_ARGUMENT naming every bad field.

All checks happen here, once, before any work is queued.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from model_store.signatures import TEXT2IMG

from .config import ServerConfig
from .errors import FieldViolation, InvalidArgument
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generation import Generation
from .registry import ModelRegistry, ServedModel

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
MIME_TYPES = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: "image/png",
    pb.OUTPUT_FORMAT_PNG: "image/png",
    pb.OUTPUT_FORMAT_JPEG: "image/jpeg",
    pb.OUTPUT_FORMAT_WEBP: "image/webp",
}


@dataclass(frozen=True)
class Limits:
    max_image_size: int
    max_steps: int
    max_images: int
    max_input_pixels: int

    @classmethod
    def of(cls, config: ServerConfig) -> Limits:
        return cls(config.max_image_size, config.max_steps, config.max_images, config.max_input_pixels)


class Violations:
    """Collects every field problem of a request, so the client learns them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument.of(self.items)


def text_to_image(request: pb.TextToImageRequest, registry: ModelRegistry, limits: Limits) -> Generation:
    served = registry.resolve(request.model)
    signature = served.signature_for(TEXT2IMG)
    bad = Violations()
    generation = _common(request.params, served, limits, bad, default_size=None)
    bad.raise_if_any()
    return Generation(
        served=served,
        signature=signature,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        **generation,
    )


def _common(
    params: pb.GenerationParams,
    served: ServedModel,
    limits: Limits,
    bad: Violations,
    default_size: tuple[int, int] | None,
) -> dict[str, Any]:
    """Check GenerationParams; returns the Generation fields they decide."""
    width0, height0 = default_size or (served.defaults.width, served.defaults.height)
    height = params.height if params.HasField("height") else height0
    width = params.width if params.HasField("width") else width0
    for name, value in (("params.height", height), ("params.width", width)):
        if value < 8 or value > limits.max_image_size or value % 8:
            bad.add(name, f"must be a multiple of 8 between 8 and {limits.max_image_size}, got {value}")
    steps = params.num_inference_steps if params.HasField("num_inference_steps") else DEFAULT_STEPS
    if not 1 <= steps <= limits.max_steps:
        bad.add("params.num_inference_steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    guidance = params.guidance_scale if params.HasField("guidance_scale") else DEFAULT_GUIDANCE
    if not math.isfinite(guidance):
        bad.add("params.guidance_scale", f"must be a finite number, got {guidance}")
    eta = params.eta if params.HasField("eta") else None
    if eta is not None and not math.isfinite(eta):
        bad.add("params.eta", f"must be a finite number, got {eta}")
    num_images = params.num_images or 1
    if num_images > limits.max_images:
        bad.add("params.num_images", f"must be between 1 and {limits.max_images}, got {num_images}")
    if params.scheduler and params.scheduler not in served.defaults.compatible_schedulers:
        choices = ", ".join(served.defaults.compatible_schedulers)
        bad.add("params.scheduler", f"unknown scheduler {params.scheduler!r}; choose one of: {choices}")
    if params.output_format not in MIME_TYPES:
        bad.add("params.output_format", f"unknown output format {params.output_format}")
    quality = params.quality if params.HasField("quality") else None
    if quality is not None and not 1 <= quality <= 100:
        bad.add("params.quality", f"must be between 1 and 100, got {quality}")
    seed = params.seed if params.HasField("seed") else secrets.randbits(63)
    return {
        "num_inference_steps": steps,
        "guidance_scale": float(guidance),
        "height": height,
        "width": width,
        "seed": seed,
        "num_images": num_images,
        "scheduler": params.scheduler,
        "eta": eta,
        "mime_type": MIME_TYPES.get(params.output_format, "image/png"),
        "quality": quality,
    }
