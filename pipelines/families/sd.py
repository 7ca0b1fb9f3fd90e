"""Stable Diffusion 1.x/2.x and SDXL: UNet families with classifier-free guidance as two rows per item.

Preparation calls the pipelines' own public methods (`encode_prompt`, `get_timesteps`, `prepare_latents`,
`prepare_mask_latents`, the image processors, the safety checker) with the item's own scheduler on the pipeline
(`scheduler_on`). Only SDXL's added time ids are computed here, as its pipelines do in their private
`_get_add_time_ids`.

Supported: the text-to-image, image-to-image and inpainting pipelines (4- and 9-channel UNets), with an
AutoencoderKL and no LCM guidance embedding (`capable`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from model_store.interface import IMG2IMG, INPAINT, TEXT2IMG

from .base import Conditioning, Start, StepInputs, Track, guidance_rows, one_per_item, scheduler_on, scheduler_step

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


class StableDiffusion:
    """Stable Diffusion 1.x/2.x."""

    classes: Mapping[str, str] = SD_CLASSES
    starts_at_index_zero = False  # SDXL text-to-image sets its scheduler's begin index to 0

    def capable(self, configs: Any, task: str) -> bool:
        """A plain AutoencoderKL, a UNet with no LCM guidance embedding, and 9 input channels only to inpaint."""
        unet = configs("unet")
        channels = unet.get("in_channels", 4)
        return (
            unet.get("time_cond_proj_dim") is None
            and configs.component("vae") == "AutoencoderKL"
            and (channels == 4 or (channels == 9 and task == INPAINT))
        )

    def rows(self, spec: StepInputs) -> int:
        return 2 if spec.cfg else 1

    def split(self, spec: StepInputs) -> Hashable:
        return None  # the UNet's cross-attention takes any mix of prompts

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        """Items with the same guidance mode share one `encode_prompt` call."""
        return one_per_item(specs, lambda spec: spec.cfg)

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """Prompt embeddings, [unconditional, conditional] with CFG."""
        cfg = specs[0].cfg
        # SD treats an absent negative prompt as the empty text: one list serves everyone.
        negatives = [spec.negative_prompt or "" for spec in specs] if cfg else None
        cond, uncond = base.encode_prompt([spec.prompt for spec in specs], device, 1, cfg, negatives)
        return guidance_rows(cfg, cond, uncond)

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        dtype = conditioning.embeds.dtype
        scheduler.set_timesteps(spec.num_inference_steps, device=device)
        with scheduler_on(pipe, scheduler):
            if spec.task == TEXT2IMG:
                if self.starts_at_index_zero and hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(0)
                channels = pipe.unet.config.in_channels
                latents = pipe.prepare_latents(1, channels, spec.height, spec.width, dtype, device, generator)
                start = Start(latents, scheduler.timesteps)
            else:
                timesteps, _ = pipe.get_timesteps(spec.num_inference_steps, spec.strength, device)
                first = timesteps[:1].repeat(1)
                if spec.task == IMG2IMG:
                    image = pipe.image_processor.preprocess(spec.image)
                    latents = self._img2img_latents(pipe, image, first, dtype, device, generator)
                    start = Start(latents, timesteps)
                else:
                    start = self._inpaint_start(pipe, spec, timesteps, first, dtype, device, generator)
        self.added_conditioning(pipe, spec, conditioning, start.latents)
        return start

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
        if nine:  # the mask and masked-image latents are extra input channels, (rows, 5, h, w)
            return Start(latents, timesteps, {"channels": torch.cat([mask, masked_latents], dim=1)})
        init_mask = mask.chunk(2)[0] if spec.cfg else mask
        return Start(latents, timesteps, {"blend": (image_latents[0], init_mask, noise)})

    def _inpaint_latents_kwargs(self) -> dict[str, Any]:
        return {}

    def added_conditioning(self, pipe: Any, spec: StepInputs, conditioning: Conditioning, latents: Any) -> None:
        """Extra per-row UNet conditioning (none for SD)."""

    def row_inputs(self, track: Track) -> dict[str, Any]:
        """Per row: the scaled latents (with the inpainting channels), the timestep and the conditioning."""
        import torch

        t = track.timestep
        latents = torch.cat([track.latents] * 2) if track.spec.cfg else track.latents
        model_input = track.scheduler.scale_model_input(latents, t)
        channels = track.state.get("channels")
        if channels is not None:
            model_input = torch.cat([model_input, channels], dim=1)
        rows = {
            "sample": model_input,
            "timestep": t.to(torch.float32).reshape(1).expand(track.rows),  # the UNet embeds timesteps in fp32
            "encoder_hidden_states": track.conditioning.embeds,
        }
        rows.update({f"added.{name}": value for name, value in track.conditioning.added.items()})
        return rows

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        added = {name.removeprefix("added."): rows for name, rows in inputs.items() if name.startswith("added.")}
        return pipe.unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]

    def advance(self, track: Track, prediction: Any) -> Any:
        """CFG as `u + g * (c - u)` (with `guidance_rescale`), the scheduler's step, then the inpaint blend."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        spec = track.spec
        if spec.cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + spec.guidance_scale * (text - uncond)
            if spec.guidance_rescale > 0.0:
                prediction = rescale_noise_cfg(prediction, text, guidance_rescale=spec.guidance_rescale)
        latents = scheduler_step(track, prediction)
        blend = track.state.get("blend")
        return latents if blend is None else self._blend(track, latents, blend)

    @staticmethod
    def _blend(track: Track, latents: Any, blend: tuple[Any, Any, Any]) -> Any:
        """4-channel inpainting: keep the unmasked area on the input image's noised trajectory."""
        image_latents, mask, noise = blend
        proper = image_latents
        if track.step < len(track.timesteps) - 1:
            proper = track.scheduler.add_noise(image_latents, noise, track.timesteps[track.step + 1 : track.step + 2])
        return (1 - mask) * proper + mask * latents

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        batch = torch.cat([t.latents for t in tracks])
        vae = base.vae
        image = vae.decode(batch / vae.config.scaling_factor, return_dict=False)[0]
        image, nsfw = base.run_safety_checker(image, device, batch.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        images = base.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)
        return images, [bool(flag) for flag in nsfw] if nsfw is not None else [False] * len(images)


class StableDiffusionXL(StableDiffusion):
    """Stable Diffusion XL: two text encoders, pooled text and size conditioning as added rows."""

    classes: Mapping[str, str] = SDXL_CLASSES
    starts_at_index_zero = True

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        """SDXL zeroes an absent negative prompt (force_zeros_for_empty_prompt) and falls back to the first
        texts where second ones are absent: items share a call only when the same texts are absent."""
        return one_per_item(
            specs,
            lambda s: (s.cfg, s.negative_prompt is None, s.prompt_2 is None, s.negative_prompt_2 is None),
        )

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        first = specs[0]
        cfg = first.cfg

        def texts(name: str) -> list[str] | None:
            return None if getattr(first, name) is None else [getattr(spec, name) for spec in specs]

        cond, uncond, pooled, uncond_pooled = base.encode_prompt(
            prompt=[spec.prompt for spec in specs],
            prompt_2=texts("prompt_2"),
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=texts("negative_prompt") if cfg else None,
            negative_prompt_2=texts("negative_prompt_2") if cfg else None,
        )
        return guidance_rows(cfg, cond, uncond, pooled, uncond_pooled, "text_embeds")

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

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        batch = torch.cat([t.latents for t in tracks])
        vae = base.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # fp16 SDXL VAEs overflow
        if upcast:
            vae.to(dtype=torch.float32)
            batch = batch.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(batch.device, batch.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(batch.device, batch.dtype)
            batch = batch * std / vae.config.scaling_factor + mean
        else:
            batch = batch / vae.config.scaling_factor
        image = vae.decode(batch, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(base, "watermark", None) is not None:
            image = base.watermark.apply_watermark(image)
        images = base.image_processor.postprocess(image, output_type="pil")
        return images, [False] * len(images)
