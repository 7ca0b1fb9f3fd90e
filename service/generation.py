"""Validated requests (`Generation`, `CallJob`), and how they become work items.

Built by `service.validation` from domain requests; nothing here knows about protobuf. Only arguments the
signature's pipeline takes are ever passed (`ServedModel.takes`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batching import BatchKey, Frozen, ProgressCallback, WorkItem, WorkKind
from model_store import Signature
from pipelines.adapters import Adapter
from pipelines.families import StepInputs
from pipelines.request_engine import ADAPTERS, EMBEDDINGS
from pipelines.step_engine import STEP_INPUT, step_key

from .registry import ServedModel

SEED_MODULUS = 2**64


@dataclass(frozen=True)
class Generation:
    """One validated typed request (text2img, img2img, inpaint or edit) for `num_images` images: every
    generation parameter is declared here once, and both engines read it (`call_arguments` and `item_inputs`
    for request batching, `step_inputs` for the step engine, whose key rules are its own: `step_key`)."""

    served: ServedModel
    signature: Signature
    task: str
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    num_images: int
    scheduler: str | None = None
    eta: float | None = None
    strength: float | None = None
    image: Any = None  # PIL RGB image, already at (width, height), for img2img / inpaint
    mask_image: Any = None  # PIL L image, same size
    mime_type: str = "image/png"
    quality: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning, (height, width)
    crops_coords_top_left: tuple[int, int] | None = None  # (top, left)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    control_images: tuple[Any, ...] = ()  # PIL RGB images at (width, height), one per ControlNet
    control_scales: tuple[float, ...] = ()
    control_guidance_start: float | None = None
    control_guidance_end: float | None = None
    loras: tuple[Adapter, ...] = ()  # at their weights, sorted by name
    embeddings: tuple[Adapter, ...] = ()  # whose tokens the prompts use
    size_given: bool = True  # False: the client left height and width to the pipeline (its own call's default)
    prompt_3: str | None = None
    negative_prompt_3: str | None = None
    true_cfg_scale: float | None = None  # resolved to the pipeline's default where it takes one
    max_sequence_length: int | None = None  # likewise
    references: tuple[Any, ...] = ()  # edit: the reference images (PIL RGB, their own sizes), in order
    cache_threshold: float | None = None  # First Block Cache (step engine only), the request's or the model's

    def denoising_steps(self) -> int:
        """The steps each image takes: all of them, or the pipelines' share of them for a strength
        (`get_timesteps`: steps - int(steps - min(steps * strength, steps)))."""
        steps = self.num_inference_steps
        if self.strength is None:
            return steps
        return steps - int(max(steps - min(steps * self.strength, steps), 0))

    def seeds(self) -> list[int]:
        """Image i uses seed + i (mod 2**64), so each image is reproducible alone."""
        return [(self.seed + i) % SEED_MODULUS for i in range(self.num_images)]

    def call_arguments(self) -> dict[str, Hashable]:
        """The arguments diffusers takes as one value for a whole call, as this signature's pipeline names them."""
        takes = self.served.takes(self.signature.name)
        arguments: dict[str, Hashable] = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "output_type": "pil",
        }
        # A size the client left out is the pipeline's to choose, as its own call would (AuraFlow, Sana and
        # Qwen-Image do not use the denoiser's sample size); an input image fixes it for img2img and inpaint.
        if takes("height") and takes("width") and (self.size_given or self.image is not None):
            arguments.update(height=self.height, width=self.width)
        if self.scheduler:
            arguments["scheduler"] = self.scheduler
        if self.eta is not None:
            arguments["eta"] = self.eta
        if self.strength is not None:
            arguments["strength"] = self.strength
        optional: dict[str, Hashable] = {
            "original_size": self.original_size,
            "crops_coords_top_left": self.crops_coords_top_left,
            "target_size": self.target_size,
            "aesthetic_score": self.aesthetic_score,
            "negative_aesthetic_score": self.negative_aesthetic_score,
            "control_guidance_start": self.control_guidance_start,
            "control_guidance_end": self.control_guidance_end,
            "true_cfg_scale": self.true_cfg_scale,
            "max_sequence_length": self.max_sequence_length,
        }
        arguments.update({name: value for name, value in optional.items() if value is not None})
        if self.control_scales:  # one float for one ControlNet, a list for several
            scales = self.control_scales
            arguments["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else Frozen.of(list(scales))
        return arguments

    def batch_key(self) -> BatchKey:
        """Items that share it may run in one pipeline call."""
        # Which per-item inputs are given must match: a list cannot mix None and text (and SDXL treats an
        # absent negative prompt differently from an empty one). Input images are resized to the output size
        # before they get here, and diffusers would silently resize mismatched inputs: never mix sizes in a call.
        group: dict[str, Hashable] = {"inputs": tuple(sorted(self.item_inputs()))}
        if self.image is not None:
            group["input_size"] = self.image.size
        if self.references:  # a pipeline would resize mismatched references to the first's size
            group["reference_sizes"] = tuple(image.size for image in self.references)
        if self.loras:  # one call applies one adapter set
            group[ADAPTERS] = self.loras
        if self.embeddings:
            group[EMBEDDINGS] = self.embeddings
        sig = self.signature
        return BatchKey.build(
            self.served.tag,
            sig.name,
            self.call_arguments(),
            kind=WorkKind.TASK,
            batchable=sig.batchable,
            batch_dim=sig.batch_dim,
            group=group,
        )

    def item_inputs(self) -> dict[str, Any]:
        """Per-item arguments, stacked along the batch dimension; an optional text not given is left out (None)."""
        texts = {
            "prompt": self.prompt,
            "prompt_2": self.prompt_2,
            "prompt_3": self.prompt_3,
            "negative_prompt": self.negative_prompt,
            "negative_prompt_2": self.negative_prompt_2,
            "negative_prompt_3": self.negative_prompt_3,
        }
        inputs: dict[str, Any] = {name: text for name, text in texts.items() if text is not None}
        if self.image is not None:
            inputs["image"] = self.image
        if self.references:  # one image, or the list a multi-reference editor takes as one item's input
            inputs["image"] = self.references[0] if len(self.references) == 1 else list(self.references)
        if self.mask_image is not None:
            inputs["mask_image"] = self.mask_image
        control = self.served.control_parameter(self.signature.name)
        if control is not None and self.control_images:
            images = self.control_images
            inputs[control] = images[0] if len(images) == 1 else list(images)  # MultiControlNet: one per net
        return inputs

    def work_items(
        self, deadline: float | None, on_progress: ProgressCallback | None = None, client: str = ""
    ) -> list[WorkItem]:
        """One item per image; the first carries the progress callback (Stream reports on the first image)."""
        steps = 0
        if self.served.engines.get(self.signature.name) == "step":
            spec = self.step_inputs()
            key = step_key(self.served.tag, self.signature.name, self.served.pipeline_class, spec)
            inputs = {STEP_INPUT: spec}
            steps = max(1, int(self.num_inference_steps * (self.strength if self.strength is not None else 1.0)))
        else:
            key, inputs = self.batch_key(), self.item_inputs()
        return [
            WorkItem(
                key=key,
                inputs=inputs,
                seed=seed,
                deadline=deadline,
                on_progress=on_progress if i == 0 else None,
                client=client,
                steps=steps,
            )
            for i, seed in enumerate(self.seeds())
        ]

    def step_inputs(self) -> StepInputs:
        return StepInputs(
            task=self.task,
            prompt=self.prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            negative_prompt=self.negative_prompt,
            prompt_2=self.prompt_2,
            negative_prompt_2=self.negative_prompt_2,
            scheduler=self.scheduler,
            eta=self.eta,
            strength=self.strength,
            image=self.image,
            mask_image=self.mask_image,
            original_size=self.original_size,
            crops_coords_top_left=self.crops_coords_top_left,
            target_size=self.target_size,
            aesthetic_score=self.aesthetic_score,
            negative_aesthetic_score=self.negative_aesthetic_score,
            loras=self.loras,
            embeddings=self.embeddings,
            prompt_3=self.prompt_3,
            negative_prompt_3=self.negative_prompt_3,
            true_cfg_scale=self.true_cfg_scale,
            max_sequence_length=self.max_sequence_length,
            references=self.references,
            size_given=self.size_given,
            cache_threshold=self.cache_threshold,
        )

    def describe(self, seed: int, size: tuple[int, int] | None = None) -> Mapping[str, str]:
        """Parameters written into each output PNG, so an image says how to make it again (`size`: the image's
        (width, height))."""
        text = {
            "model": self.served.tag,
            "signature": self.signature.name,
            "task": self.task,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt or "",
            "seed": str(seed),
            "num_inference_steps": str(self.num_inference_steps),
            "guidance_scale": repr(self.guidance_scale),
            "scheduler": self.scheduler or self.served.defaults.scheduler,
        }
        width, height = size or (self.width, self.height)  # the image's own: the pipeline's choice when not given
        text.update(height=str(height), width=str(width))
        if self.strength is not None:
            text["strength"] = repr(self.strength)
        if self.eta is not None:
            text["eta"] = repr(self.eta)
        optional = (
            "prompt_2",
            "negative_prompt_2",
            "prompt_3",
            "negative_prompt_3",
            "true_cfg_scale",
            "cache_threshold",
        )
        for name in (*optional, "max_sequence_length", "original_size", "crops_coords_top_left", "target_size"):
            if getattr(self, name) is not None:
                text[name] = str(getattr(self, name))
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
    animated_webp: bool = False  # also return video outputs as animated WebP

    def work_items(
        self, deadline: float | None, on_progress: ProgressCallback | None = None, client: str = ""
    ) -> list[WorkItem]:
        per_item = {k: v for k, v in self.arguments.items() if k in PER_ITEM_ARGUMENTS and isinstance(v, str)}
        per_item.update(self.images)
        shared = {k: _hashable(v) for k, v in self.arguments.items() if k not in per_item}
        key = BatchKey.build(
            self.served.tag,
            self.signature.name,
            shared,
            kind=WorkKind.CALL,
            # Only calls with per-item arguments can be stacked; anything else runs alone.
            batchable=self.signature.batchable and bool(per_item),
            batch_dim=self.signature.batch_dim,
            group={f"size:{k}": image.size for k, image in self.images.items()},
        )
        images, _ = images_asked(dict(self.arguments))
        item = WorkItem(key, per_item, self.seed, deadline, on_progress, client=client, cost=images)
        return [item]

    def describe(self, seed: int) -> Mapping[str, str]:
        text = {"model": self.served.tag, "signature": self.signature.name, "seed": str(seed)}
        text.update({k: str(v) for k, v in self.arguments.items()})
        return text


# Per-prompt arguments of a Call: a list of N makes N images (times num_images_per_prompt).
PER_PROMPT = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")


def images_asked(arguments: dict[str, Any]) -> tuple[int, str]:
    """How many images a call makes: every list-valued prompt counts its prompts, and `batch_size` and
    `num_images_per_prompt` multiply (frames are counted apart); and the argument to name when that is too many."""
    ints = {name: value for name, value in arguments.items() if isinstance(value, int) and not isinstance(value, bool)}
    lists = {name: len(value) for name, value in arguments.items() if name in PER_PROMPT and isinstance(value, list)}
    field = max(lists, key=lambda name: lists[name]) if lists else "num_images_per_prompt"
    prompts = lists.get(field, 1)
    if ints.get("batch_size", 1) > prompts:
        prompts, field = ints["batch_size"], "batch_size"
    per_prompt = ints.get("num_images_per_prompt", 1)
    if prompts == 1:
        field = "num_images_per_prompt"
    return prompts * per_prompt, field


def _hashable(value: Any) -> Hashable:
    """Struct lists and dicts travel frozen inside the batch key; the engine thaws them."""
    return Frozen.of(value) if isinstance(value, (list, dict)) else value
