"""Requests as the client sent them, in plain Python: what `convert` makes of proto messages, before validation.

A field the client did not give is None. An empty proto string means "not given" too, so an optional text such
as `negative_prompt` is None, never "" (SDXL, for one, treats the two differently).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL micro-conditioning, in pixels; None where the client left the pipeline's default."""

    original_height: int | None = None
    original_width: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    target_height: int | None = None
    target_width: int | None = None

    def given(self) -> bool:
        return any(value is not None for value in vars(self).values())


@dataclass(frozen=True)
class Params:
    """GenerationParams: None where the client left the model's default."""

    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    eta: float | None = None
    output_format: str = "png"  # "png", "jpeg", "webp", or "#N" for an enum value this server does not know
    quality: int | None = None
    size_conditioning: SizeConditioning = field(default_factory=SizeConditioning)
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    control_scales: tuple[float, ...] = ()
    control_guidance_start: float | None = None
    control_guidance_end: float | None = None
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA (name, weight) pairs, as sent
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    cache: tuple[str, float] | None = None  # (method, threshold) as sent; None: the model's default


@dataclass(frozen=True)
class TaskRequest:
    """A TextToImage, ImageToImage, Inpaint or Edit request."""

    task: str  # "text2img", "img2img", "inpaint" or "edit"
    model: str
    prompt: str
    negative_prompt: str | None = None
    params: Params = field(default_factory=Params)
    image: bytes | None = None  # encoded input image (img2img, inpaint)
    mask_image: bytes | None = None  # encoded mask (inpaint)
    strength: float | None = None
    prompt_2: str | None = None  # SDXL's second text encoder
    negative_prompt_2: str | None = None
    control_images: tuple[bytes, ...] = ()  # encoded ControlNet conditioning images, one per ControlNet
    prompt_3: str | None = None  # SD3's T5 prompt
    negative_prompt_3: str | None = None
    images: tuple[bytes, ...] = ()  # encoded reference images (edit), in order


@dataclass(frozen=True)
class CallRequest:
    """A Call of a declared signature by name."""

    model: str
    signature: str
    arguments: Mapping[str, Any]  # JSON-like values
    images: Mapping[str, bytes]  # encoded image arguments by name
    seed: int | None = None
    output_format: str = "png"
    animated_webp: bool = False  # also return video frames as one animated WebP
