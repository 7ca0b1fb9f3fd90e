"""The domain form of a validated generation request, and how it becomes work items.

Built from a proto request by `service.validation`, turned into `batching.WorkItem`s here. Nothing in this
module knows about protobuf.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batching import BatchKey, WorkItem
from batching.items import ProgressCallback
from model_store import Signature

from .registry import ServedModel

SEED_MODULUS = 2**64


@dataclass(frozen=True)
class Generation:
    """One validated request for `num_images` images from one signature of one model."""

    served: ServedModel
    signature: Signature
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    num_images: int
    scheduler: str = ""
    eta: float | None = None
    strength: float | None = None
    image: Any = None  # PIL image for img2img / inpaint
    mask_image: Any = None
    mime_type: str = "image/png"
    quality: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def seeds(self) -> list[int]:
        """Image i uses seed + i (mod 2**64), so each image is reproducible alone."""
        return [(self.seed + i) % SEED_MODULUS for i in range(self.num_images)]

    def batch_key(self) -> BatchKey:
        """Everything diffusers takes as one value for a whole call; items that share it may batch."""
        params: dict[str, Hashable] = {
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "output_type": "pil",
        }
        if self.scheduler:
            params["scheduler"] = self.scheduler
        if self.eta is not None:
            params["eta"] = self.eta
        if self.strength is not None:
            params["strength"] = self.strength
        group = {"input_size": self.image.size} if self.image is not None else None
        sig = self.signature
        return BatchKey.build(
            self.served.tag, sig.name, params, batchable=sig.batchable, batch_dim=sig.batch_dim, group=group
        )

    def work_items(self, deadline: float | None, on_progress: ProgressCallback | None = None) -> list[WorkItem]:
        key = self.batch_key()
        inputs: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
        if self.image is not None:
            inputs["image"] = self.image
        if self.mask_image is not None:
            inputs["mask_image"] = self.mask_image
        return [
            WorkItem(key=key, inputs=inputs, seed=seed, deadline=deadline, on_progress=on_progress)
            for seed in self.seeds()
        ]

    def describe(self, seed: int) -> Mapping[str, str]:
        """Parameters written into each output PNG, so an image says how to make it again."""
        text = {
            "model": self.served.tag,
            "signature": self.signature.name,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": str(seed),
            "num_inference_steps": str(self.num_inference_steps),
            "guidance_scale": repr(self.guidance_scale),
            "scheduler": self.scheduler or self.served.defaults.scheduler,
            "height": str(self.height),
            "width": str(self.width),
        }
        if self.strength is not None:
            text["strength"] = repr(self.strength)
        if self.eta is not None:
            text["eta"] = repr(self.eta)
        return text
