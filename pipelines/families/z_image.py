"""Z-Image (and Z-Image-Turbo): a single-stream flow-matching DiT conditioned on a Qwen3's hidden states, as
`ZImagePipeline` and `ZImageImg2ImgPipeline` run it.

The transformer takes lists: one latent and one caption embedding per row, each caption as long as its tokens,
and pads and masks them itself. So rows of any text length share a call, and only the latent size splits one.
Classifier-free guidance is on whenever `guidance_scale > 0` (Turbo runs at 0); it is the item's second row,
[positive, negative], combined as `p + g * (p - n)`. The pipelines' `cfg_normalization` and `cfg_truncation`
keep their defaults (no RPC sets them), under which they change nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from model_store.interface import IMG2IMG, TEXT2IMG

from .base import Conditioning, Start, StepInputs, Track, one_per_item, resolution_shift, scheduler_on, text_rows

Z_IMAGE_CLASSES = {"ZImagePipeline": TEXT2IMG, "ZImageImg2ImgPipeline": IMG2IMG}
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__'s


def cfg(spec: StepInputs) -> bool:
    """The pipelines' `do_classifier_free_guidance`: guidance above 0, not 1."""
    return spec.guidance_scale > 0


class ZImage:
    """Z-Image text-to-image and image-to-image."""

    classes: Mapping[str, str] = Z_IMAGE_CLASSES

    def capable(self, configs: Any, task: str) -> bool:
        return configs.component("vae") == "AutoencoderKL" and configs.component("transformer") == (
            "ZImageTransformer2DModel"
        )

    def rows(self, spec: StepInputs) -> int:
        return 2 if cfg(spec) else 1

    def split(self, spec: StepInputs) -> Hashable:
        return None  # the transformer pads and masks captions of any length

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        return one_per_item(specs, lambda spec: spec.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """Positive and negative prompts in one `encode_prompt` call: the pipeline pads every text to
        `max_sequence_length`, so a text encodes alike whatever shares the call."""
        texts = [spec.prompt for spec in specs] + [spec.negative_prompt or "" for spec in specs if cfg(spec)]
        length = specs[0].max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        embeds, _ = base.encode_prompt(
            prompt=texts, device=device, do_classifier_free_guidance=False, max_sequence_length=length
        )
        return text_rows(embeds, specs, cfg)

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        import torch
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

        channels = pipe.transformer.in_channels
        steps = spec.num_inference_steps
        sigmas = get_default_z_image_sigmas(steps)
        factor = pipe.vae_scale_factor
        seq_len = (2 * (int(spec.height) // (factor * 2)) // 2) * (2 * (int(spec.width) // (factor * 2)) // 2)
        mu = resolution_shift(scheduler.config, seq_len, max_shift=1.15)
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        if spec.task == TEXT2IMG:
            latents = pipe.prepare_latents(1, channels, spec.height, spec.width, torch.float32, device, generator)
            scheduler.set_begin_index(0)
        else:
            init_image = pipe.image_processor.preprocess(spec.image).to(dtype=torch.float32)
            dtype = conditioning.embeds[0].dtype
            with scheduler_on(pipe, scheduler):
                timesteps, _ = pipe.get_timesteps(steps, spec.strength, device)
                latents = pipe.prepare_latents(
                    init_image, timesteps[:1].repeat(1), 1, channels, spec.height, spec.width, dtype, device, generator
                )
        return Start(latents, timesteps)

    def row_inputs(self, track: Track) -> dict[str, Any]:
        rows = track.rows
        transformer_dtype = track.pipe.transformer.dtype
        latent = track.latents.to(transformer_dtype).unsqueeze(2)[0]  # (channels, frames = 1, h, w)
        return {
            "x": [latent] * rows,
            "t": ((1000 - track.timestep.expand(rows)) / 1000),
            "cap_feats": list(track.conditioning.embeds),
        }

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        return pipe.transformer(
            inputs["x"], inputs["t"], inputs["cap_feats"], joint_attention_kwargs=None, return_dict=False
        )[0]

    def advance(self, track: Track, prediction: Any) -> Any:
        import torch

        if track.rows == 2:
            positive, negative = prediction[0].float(), prediction[1].float()
            noise = torch.stack([positive + track.spec.guidance_scale * (positive - negative)])
        else:
            noise = torch.stack([prediction[0].float()])
        noise = -noise.squeeze(2)
        return track.scheduler.step(noise.to(torch.float32), track.timestep, track.latents, return_dict=False)[0]

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        vae = base.vae
        latents = torch.cat([t.latents for t in tracks]).to(vae.dtype)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        images = base.image_processor.postprocess(image, output_type="pil")
        return images, [False] * len(images)
