"""Domain forms of validated requests, and how they become work items.

Built from proto requests by `service.validation`, turned into `batching.WorkItem`s here. Nothing in this module
knows about protobuf.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batching import BatchKey, WorkItem
from batching.diffusers_runner import CALL_GROUP
from batching.items import Frozen, ProgressCallback
from model_store import Signature
from model_store.signatures import TEXT2IMG

from .registry import ServedModel

SEED_MODULUS = 2**64


@dataclass(frozen=True)
class Generation:
    """One validated typed request (text2img, img2img or inpaint) for `num_images` images."""

    served: ServedModel
    signature: Signature
    task: str
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
    image: Any = None  # PIL RGB image, already at (width, height), for img2img / inpaint
    mask_image: Any = None  # PIL L image, same size
    mime_type: str = "image/png"
    quality: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def seeds(self) -> list[int]:
        """Image i uses seed + i (mod 2**64), so each image is reproducible alone."""
        return [(self.seed + i) % SEED_MODULUS for i in range(self.num_images)]

    def batch_key(self) -> BatchKey:
        """Everything diffusers takes as one value for a whole call; items that share it may batch."""
        params: dict[str, Hashable] = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "output_type": "pil",
        }
        if self.task == TEXT2IMG:
            params.update(height=self.height, width=self.width)
        if self.scheduler:
            params["scheduler"] = self.scheduler
        if self.eta is not None:
            params["eta"] = self.eta
        if self.strength is not None:
            params["strength"] = self.strength
        # Input images are resized to the output size before they get here; img2img pipelines take their size
        # from the image, and diffusers would silently resize mismatched inputs: never mix sizes in a call.
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
            WorkItem(key=key, inputs=inputs, seed=seed, deadline=deadline, on_progress=on_progress if i == 0 else None)
            for i, seed in enumerate(self.seeds())
        ]

    def describe(self, seed: int) -> Mapping[str, str]:
        """Parameters written into each output PNG, so an image says how to make it again."""
        text = {
            "model": self.served.tag,
            "signature": self.signature.name,
            "task": self.task,
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


# Arguments a generic call stacks per item when its signature is batchable; the rest must match to batch.
PER_ITEM_ARGUMENTS = ("prompt", "negative_prompt")


@dataclass(frozen=True)
class CallJob:
    """One validated generic Call: a declared signature with checked keyword arguments."""

    served: ServedModel
    signature: Signature
    arguments: Mapping[str, Any]  # JSON-like values, already coerced to the method's parameter types
    images: Mapping[str, Any]  # PIL images by argument name
    seed: int
    mime_type: str = "image/png"

    def work_items(self, deadline: float | None, on_progress: ProgressCallback | None = None) -> list[WorkItem]:
        per_item = {k: v for k, v in self.arguments.items() if k in PER_ITEM_ARGUMENTS and isinstance(v, str)}
        per_item.update(self.images)
        shared = {k: _hashable(v) for k, v in self.arguments.items() if k not in per_item}
        group: dict[str, Hashable] = dict([CALL_GROUP])
        group.update({f"size:{k}": image.size for k, image in self.images.items()})
        key = BatchKey.build(
            self.served.tag,
            self.signature.name,
            shared,
            # Only calls with per-item arguments can be stacked; anything else runs alone.
            batchable=self.signature.batchable and bool(per_item),
            batch_dim=self.signature.batch_dim,
            group=group,
        )
        return [WorkItem(key=key, inputs=per_item, seed=self.seed, deadline=deadline, on_progress=on_progress)]

    def describe(self, seed: int) -> Mapping[str, str]:
        text = {"model": self.served.tag, "signature": self.signature.name, "seed": str(seed)}
        text.update({k: str(v) for k, v in self.arguments.items()})
        return text


def _hashable(value: Any) -> Hashable:
    """Struct lists and dicts travel frozen inside the batch key; the runner thaws them."""
    return Frozen.of(value) if isinstance(value, (list, dict)) else value
