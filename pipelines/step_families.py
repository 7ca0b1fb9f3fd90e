"""What the step engine needs from a pipeline family, done the family's own way so each image equals the direct
`pipe(...)` call: how prompts are encoded, how an item's starting latents are prepared, which extra
conditioning rows the UNet takes, and how finished latents become images.

Preparation calls the pipelines' own public methods (`encode_prompt`, `get_timesteps`, `prepare_latents`,
`prepare_mask_latents`, the image processors, the safety checker). Those read `self.scheduler`, so they run with
the item's own scheduler put on the pipeline for the duration (`scheduler_on`): safe, because a worker owns its
replica and is the only thread that touches it. Only SDXL's added time ids are computed here, as its pipelines
do in their private `_get_add_time_ids`.

Supported: the Stable Diffusion 1.x/2.x and SDXL text-to-image, image-to-image and inpainting pipelines (4- and
9-channel UNets), with an AutoencoderKL and no LCM guidance embedding. Anything else stays on request batching.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from model_store.interface import IMG2IMG, INPAINT, TEXT2IMG

from .adapters import Adapter

SD_CLASSES = {
    "StableDiffusionPipeline": TEXT2IMG,
    "StableDiffusionImg2ImgPipeline": IMG2IMG,
    "StableDiffusionInpaintPipeline": INPAINT,
}
SDXL_CLASSES = {
    "StableDiffusionXLPipeline": TEXT2IMG,
    "StableDiffusionXLImg2ImgPipeline": IMG2IMG,
    "StableDiffusionXLInpaintPipeline": INPAINT,
}


@dataclass(frozen=True)
class StepInputs:
    """One image to denoise: the typed task's call arguments, all of them per item."""

    task: str
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    scheduler: str | None = None  # a compatible scheduler class name; None: the model's own
    eta: float | None = None
    strength: float | None = None  # img2img and inpaint, already resolved to the pipeline's default
    image: Any = None  # PIL RGB at (width, height)
    mask_image: Any = None  # PIL L at (width, height)
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    guidance_rescale: float = 0.0
    loras: tuple[Adapter, ...] = ()  # LoRAs at their weights
    embeddings: tuple[Adapter, ...] = ()  # embeddings whose tokens the prompts use

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: two UNet rows (unconditional, conditional), as the pipelines decide it."""
        return self.guidance_scale > 1


@dataclass
class Conditioning:
    """One item's conditioning rows, in the pipeline's order ([unconditional, conditional] with CFG)."""

    embeds: Any  # encoder hidden states, (rows, tokens, dim)
    added: dict[str, Any] = field(default_factory=dict)  # SDXL: text_embeds, time_ids, (rows, ...) each


@dataclass
class Start:
    """Where an item's denoising starts."""

    latents: Any  # (1, C, h, w)
    timesteps: Any  # the item's own schedule (after strength), on the device
    channels: Any = None  # 9-channel inpainting: mask and masked-image latents to append, (rows, 5, h, w)
    blend: tuple[Any, Any, Any] | None = None  # 4-channel inpainting: (image latents, mask, noise)


@contextlib.contextmanager
def scheduler_on(pipe: Any, scheduler: Any) -> Iterator[None]:
    """Run pipeline methods that read `self.scheduler` with an item's own scheduler."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = own


def step_kwargs(scheduler: Any, eta: float | None, generator: Any) -> dict[str, Any]:
    """`prepare_extra_step_kwargs`: eta (the pipelines' default is 0.0) and the generator, where `step` takes them."""
    params = _step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0 if eta is None else eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


_STEP_PARAMETERS: dict[type, frozenset[str]] = {}


def _step_parameters(cls: type) -> frozenset[str]:
    if cls not in _STEP_PARAMETERS:
        _STEP_PARAMETERS[cls] = frozenset(inspect.signature(cls.step).parameters)  # type: ignore[attr-defined]
    return _STEP_PARAMETERS[cls]


class Family:
    """Stable Diffusion 1.x/2.x."""

    classes = SD_CLASSES
    starts_at_index_zero = False  # SDXL text-to-image sets its scheduler's begin index to 0

    def encode(self, base: Any, inputs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """Prompt embeddings for items that share classifier-free guidance (one text-encoder call for them all)."""
        import torch

        cfg = inputs[0].cfg
        # SD treats an absent negative prompt as the empty text: one list serves everyone.
        negatives = [spec.negative_prompt or "" for spec in inputs] if cfg else None
        cond, uncond = base.encode_prompt([spec.prompt for spec in inputs], device, 1, cfg, negatives)
        if not cfg:
            return [Conditioning(cond[i : i + 1]) for i in range(len(inputs))]
        return [Conditioning(torch.cat([uncond[i : i + 1], cond[i : i + 1]])) for i in range(len(inputs))]

    def encode_groups(self, inputs: Sequence[StepInputs]) -> dict[tuple[bool, ...], list[int]]:
        """Which items can share one `encode_prompt` call: those with the same guidance mode."""
        groups: dict[tuple[bool, ...], list[int]] = {}
        for index, spec in enumerate(inputs):
            groups.setdefault((spec.cfg,), []).append(index)
        return groups

    def start(self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, dtype: Any) -> Start:
        """The item's schedule and starting latents, as the task's pipeline makes them with `scheduler`."""
        scheduler.set_timesteps(spec.num_inference_steps, device=device)
        with scheduler_on(pipe, scheduler):
            if spec.task == TEXT2IMG:
                if self.starts_at_index_zero and hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(0)
                channels = pipe.unet.config.in_channels
                latents = pipe.prepare_latents(1, channels, spec.height, spec.width, dtype, device, generator)
                return Start(latents, scheduler.timesteps)
            timesteps, _ = pipe.get_timesteps(spec.num_inference_steps, spec.strength, device)
            first = timesteps[:1].repeat(1)
            if spec.task == IMG2IMG:
                image = pipe.image_processor.preprocess(spec.image)
                return Start(self._img2img_latents(pipe, image, first, dtype, device, generator), timesteps)
            return self._inpaint_start(pipe, spec, timesteps, first, dtype, device, generator)

    def _img2img_latents(self, pipe: Any, image: Any, first: Any, dtype: Any, device: Any, generator: Any) -> Any:
        return pipe.prepare_latents(image, first, 1, 1, dtype, device, generator)

    def _inpaint_start(
        self, pipe: Any, spec: StepInputs, timesteps: Any, first: Any, dtype: Any, device: Any, generator: Any
    ) -> Start:
        import torch

        height, width = spec.height, spec.width
        init_image = pipe.image_processor.preprocess(spec.image, height=height, width=width, resize_mode="default")
        init_image = init_image.to(dtype=torch.float32)
        nine = pipe.unet.config.in_channels == 9
        latents, noise, *image_latents = pipe.prepare_latents(
            1,
            pipe.vae.config.latent_channels,
            height,
            width,
            dtype,
            device,
            generator,
            None,
            image=init_image,
            timestep=first,
            is_strength_max=spec.strength == 1.0,
            return_noise=True,
            return_image_latents=not nine,
            **self._inpaint_latents_kwargs(),
        )
        mask = pipe.mask_processor.preprocess(spec.mask_image, height=height, width=width, resize_mode="default")
        masked = init_image * (mask < 0.5)
        mask, masked_latents = pipe.prepare_mask_latents(
            mask, masked, 1, height, width, dtype, device, generator, spec.cfg
        )
        if nine:
            return Start(latents, timesteps, channels=torch.cat([mask, masked_latents], dim=1))
        init_mask = mask.chunk(2)[0] if spec.cfg else mask
        return Start(latents, timesteps, blend=(image_latents[0], init_mask, noise))

    def _inpaint_latents_kwargs(self) -> dict[str, Any]:
        return {}

    def added_conditioning(self, pipe: Any, spec: StepInputs, conditioning: Conditioning, latents: Any) -> None:
        """Extra per-row UNet conditioning (none for SD)."""

    def decode(self, base: Any, latents: Any, device: Any) -> tuple[list[Any], list[bool]]:
        """Images (PIL) and NSFW flags for finished latents, decoded together."""
        vae = base.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        image, nsfw = base.run_safety_checker(image, device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        images = base.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)
        return images, [bool(flag) for flag in nsfw] if nsfw is not None else [False] * len(images)


class SDXLFamily(Family):
    """Stable Diffusion XL: two text encoders, pooled text and size conditioning as added rows."""

    classes = SDXL_CLASSES
    starts_at_index_zero = True

    def encode_groups(self, inputs: Sequence[StepInputs]) -> dict[tuple[bool, ...], list[int]]:
        """SDXL zeroes an absent negative prompt (force_zeros_for_empty_prompt) and falls back to the first
        texts where second ones are absent: items share a call only when the same texts are absent."""
        groups: dict[tuple[bool, ...], list[int]] = {}
        for index, spec in enumerate(inputs):
            absent = (spec.negative_prompt is None, spec.prompt_2 is None, spec.negative_prompt_2 is None)
            groups.setdefault((spec.cfg, *absent), []).append(index)
        return groups

    def encode(self, base: Any, inputs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        import torch

        first = inputs[0]
        cfg = first.cfg

        def texts(name: str) -> list[str] | None:
            return None if getattr(first, name) is None else [getattr(spec, name) for spec in inputs]

        cond, uncond, pooled, uncond_pooled = base.encode_prompt(
            prompt=[spec.prompt for spec in inputs],
            prompt_2=texts("prompt_2"),
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=texts("negative_prompt") if cfg else None,
            negative_prompt_2=texts("negative_prompt_2") if cfg else None,
        )
        result = []
        for i in range(len(inputs)):
            if cfg:
                embeds = torch.cat([uncond[i : i + 1], cond[i : i + 1]])
                text = torch.cat([uncond_pooled[i : i + 1], pooled[i : i + 1]])
            else:
                embeds, text = cond[i : i + 1], pooled[i : i + 1]
            result.append(Conditioning(embeds, {"text_embeds": text}))
        return result

    def _img2img_latents(self, pipe: Any, image: Any, first: Any, dtype: Any, device: Any, generator: Any) -> Any:
        return pipe.prepare_latents(image, first, 1, 1, dtype, device, generator, True)

    def _inpaint_latents_kwargs(self) -> dict[str, Any]:
        return {"add_noise": True}

    def added_conditioning(self, pipe: Any, spec: StepInputs, conditioning: Conditioning, latents: Any) -> None:
        """The size (and, for a refiner, aesthetic-score) time ids, per row, as the task's pipeline builds them."""
        import torch

        height, width = (side * pipe.vae_scale_factor for side in latents.shape[-2:])
        original = spec.original_size or (height, width)
        crops = spec.crops_coords_top_left or (0, 0)
        target = spec.target_size or (height, width)
        if spec.task == TEXT2IMG:
            ids = negative_ids = [*original, *crops, *target]
        elif pipe.config.requires_aesthetics_score:  # the refiner conditions on aesthetic scores, not target size
            aesthetic = 6.0 if spec.aesthetic_score is None else spec.aesthetic_score
            negative = 2.5 if spec.negative_aesthetic_score is None else spec.negative_aesthetic_score
            ids, negative_ids = [*original, *crops, aesthetic], [*original, 0, 0, negative]
        else:  # diffusers builds the negative ids with the positive crop here
            ids = negative_ids = [*original, *crops, *target]
        dtype, device = conditioning.embeds.dtype, conditioning.embeds.device
        rows = [negative_ids, ids] if spec.cfg else [ids]
        conditioning.added["time_ids"] = torch.tensor(rows, dtype=dtype).to(device)

    def decode(self, base: Any, latents: Any, device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        vae = base.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # fp16 SDXL VAEs overflow
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(base, "watermark", None) is not None:
            image = base.watermark.apply_watermark(image)
        images = base.image_processor.postprocess(image, output_type="pil")
        return images, [False] * len(images)


FAMILIES: tuple[Family, ...] = (Family(), SDXLFamily())


def family_of(pipeline_class: type) -> Family | None:
    """The family whose step path reproduces this class's `__call__` exactly, or None."""
    return next((family for family in FAMILIES if pipeline_class.__name__ in family.classes), None)


def step_capable(pipeline_class: type, task_class: type | None, folder: Any) -> bool:
    """Whether the step engine reproduces a signature exactly: a Stable Diffusion or SDXL pipeline (base and
    task), a plain AutoencoderKL, a UNet with no LCM guidance embedding, and 9 input channels only to inpaint."""
    import json
    from pathlib import Path

    base, task = family_of(pipeline_class), family_of(task_class) if task_class is not None else None
    if base is None or task is not base or task_class is None:
        return False

    def config(*parts: str) -> dict[str, Any]:
        try:
            return dict(json.loads(Path(folder, *parts).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    unet, index = config("unet", "config.json"), config("model_index.json")
    channels = unet.get("in_channels", 4)
    return (
        unet.get("time_cond_proj_dim") is None
        and (index.get("vae") or [None, None])[-1] == "AutoencoderKL"
        and (channels == 4 or (channels == 9 and base.classes[task_class.__name__] == INPAINT))
    )
