"""Stable Diffusion 3 / 3.5: a flow-matching MMDiT over two CLIP encoders and T5, with classifier-free guidance
as two rows per item ([unconditional, conditional]), as `StableDiffusion3Pipeline` and its image-to-image
pipeline run it. Joint attention has no text mask, so items share a call only with the same latent size and
`max_sequence_length` (`split`). Skip-layer guidance is not served here (no RPC sets it).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from model_store.interface import IMG2IMG, TEXT2IMG

from .base import Conditioning, Start, StepInputs, Track, guidance_rows, one_per_item, resolution_shift, scheduler_on

SD3_CLASSES = {"StableDiffusion3Pipeline": TEXT2IMG, "StableDiffusion3Img2ImgPipeline": IMG2IMG}
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s


class StableDiffusion3:
    """SD3 text-to-image and image-to-image."""

    classes: Mapping[str, str] = SD3_CLASSES

    def capable(self, configs: Any, task: str) -> bool:
        return configs.component("vae") == "AutoencoderKL" and configs.component("transformer") == (
            "SD3Transformer2DModel"
        )

    def rows(self, spec: StepInputs) -> int:
        return 2 if spec.cfg else 1

    def split(self, spec: StepInputs) -> Hashable:
        return spec.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH  # 77 CLIP tokens + T5 padded to this

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        return one_per_item(specs, lambda spec: (spec.cfg, self.split(spec)))

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """One `encode_prompt` call; every absent text falls back per item as the pipeline's `or` chain does."""
        cfg = specs[0].cfg
        negatives = [spec.negative_prompt or "" for spec in specs]
        cond, uncond, pooled, uncond_pooled = base.encode_prompt(
            prompt=[spec.prompt for spec in specs],
            prompt_2=[spec.prompt_2 or spec.prompt for spec in specs],
            prompt_3=[spec.prompt_3 or spec.prompt for spec in specs],
            negative_prompt=negatives if cfg else None,
            negative_prompt_2=[s.negative_prompt_2 or n for s, n in zip(specs, negatives)] if cfg else None,
            negative_prompt_3=[s.negative_prompt_3 or n for s, n in zip(specs, negatives)] if cfg else None,
            do_classifier_free_guidance=cfg,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.split(specs[0]),
        )
        return guidance_rows(cfg, cond, uncond, pooled, uncond_pooled, "pooled_projections")

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        dtype = conditioning.embeds.dtype
        patch = pipe.transformer.config.patch_size
        factor = pipe.vae_scale_factor
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            seq_len = (int(spec.height) // factor // patch) * (int(spec.width) // factor // patch)
            kwargs["mu"] = resolution_shift(scheduler.config, seq_len, max_shift=1.16)
        timesteps, _ = retrieve_timesteps(scheduler, spec.num_inference_steps, device, sigmas=None, **kwargs)
        with scheduler_on(pipe, scheduler):
            if spec.task == TEXT2IMG:
                channels = pipe.transformer.config.in_channels
                latents = pipe.prepare_latents(1, channels, spec.height, spec.width, dtype, device, generator)
            else:
                image = pipe.image_processor.preprocess(spec.image, height=spec.height, width=spec.width)
                timesteps, _ = pipe.get_timesteps(spec.num_inference_steps, spec.strength, device)
                latents = pipe.prepare_latents(image, timesteps[:1].repeat(1), 1, 1, dtype, device, generator)
        return Start(latents, timesteps)

    def row_inputs(self, track: Track) -> dict[str, Any]:
        import torch

        rows = track.rows
        return {
            "hidden_states": torch.cat([track.latents] * rows) if rows > 1 else track.latents,
            "timestep": track.timestep.expand(rows),
            "encoder_hidden_states": track.conditioning.embeds,
            "pooled_projections": track.conditioning.added["pooled_projections"],
        }

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        return pipe.transformer(**inputs, joint_attention_kwargs=None, return_dict=False)[0]

    def advance(self, track: Track, prediction: Any) -> Any:
        if track.rows == 2:
            uncond, text = prediction.chunk(2)
            prediction = uncond + track.spec.guidance_scale * (text - uncond)
        return track.scheduler.step(prediction, track.timestep, track.latents, return_dict=False)[0]

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        vae = base.vae
        latents = torch.cat([t.latents for t in tracks])
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        images = base.image_processor.postprocess(image, output_type="pil")
        return images, [False] * len(images)
