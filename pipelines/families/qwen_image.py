"""Qwen-Image: a flow-matching MMDiT over packed latents, conditioned on a Qwen2.5-VL's hidden states, as
`QwenImagePipeline` and `QwenImageImg2ImgPipeline` run it.

True CFG (a negative prompt with `true_cfg_scale > 1`; the pipelines' default scale is 4.0) is the item's
second row, [conditional, negative], combined as `n + s * (c - n)` and rescaled to the conditional row's norm.
A prompt's embedding is as long as its tokens (the template's system part dropped), and the transformer takes a
text mask: rows of different lengths share one call, padded and masked (`denoise`), so only the latent size
splits a call. When every row of a call has one length no mask is passed, as the direct call passes none.
Guidance-distilled checkpoints (`guidance_embeds`) stay on request batching.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from model_store.interface import IMG2IMG, TEXT2IMG

from .base import Conditioning, Start, StepInputs, Track, one_per_item, resolution_shift, scheduler_on, text_rows

QWEN_IMAGE_CLASSES = {"QwenImagePipeline": TEXT2IMG, "QwenImageImg2ImgPipeline": IMG2IMG}
DEFAULT_TRUE_CFG_SCALE = 4.0  # QwenImagePipeline.__call__'s
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def true_cfg(spec: StepInputs) -> bool:
    """The pipelines' `do_true_cfg`: a negative prompt and `true_cfg_scale > 1`."""
    scale = DEFAULT_TRUE_CFG_SCALE if spec.true_cfg_scale is None else spec.true_cfg_scale
    return spec.negative_prompt is not None and scale > 1


class QwenImage:
    """Qwen-Image text-to-image and image-to-image."""

    classes: Mapping[str, str] = QWEN_IMAGE_CLASSES

    def capable(self, configs: Any, task: str) -> bool:
        transformer = configs("transformer")
        return (
            configs.component("vae") == "AutoencoderKLQwenImage"
            and configs.component("transformer") == "QwenImageTransformer2DModel"
            and not transformer.get("guidance_embeds", False)
        )

    def rows(self, spec: StepInputs) -> int:
        return 2 if true_cfg(spec) else 1

    def split(self, spec: StepInputs) -> Hashable:
        return None  # text of any length shares a call, padded and masked

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        return one_per_item(specs, lambda spec: spec.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """One `encode_prompt` call per token count: the pipeline pads a batch to its longest prompt, so only
        texts of one length encode together exactly as each does alone."""
        texts = [spec.prompt for spec in specs] + [spec.negative_prompt or "" for spec in specs if true_cfg(spec)]
        length = specs[0].max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        embeds: list[Any] = [None] * len(texts)
        for indices in one_per_item(texts, lambda text: _token_count(base, text)).values():
            rows, _ = base.encode_prompt(
                prompt=[texts[i] for i in indices], device=device, num_images_per_prompt=1, max_sequence_length=length
            )
            for position, index in enumerate(indices):
                embeds[index] = rows[position : position + 1]
        return text_rows(embeds, specs, true_cfg)

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        import numpy as np
        import torch
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

        dtype = conditioning.embeds[0].dtype
        channels = pipe.transformer.config.in_channels // 4
        factor = pipe.vae_scale_factor
        steps = spec.num_inference_steps
        sigmas: Any = np.linspace(1.0, 1 / steps, steps)
        if spec.task == TEXT2IMG:
            latents = pipe.prepare_latents(1, channels, spec.height, spec.width, dtype, device, generator)
            mu = resolution_shift(scheduler.config, latents.shape[1], max_shift=1.15)
            timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
            scheduler.set_begin_index(0)
        else:
            init_image = pipe.image_processor.preprocess(spec.image, height=spec.height, width=spec.width)
            init_image = init_image.to(dtype=torch.float32)
            seq_len = (int(spec.height) // factor // 2) * (int(spec.width) // factor // 2)
            mu = resolution_shift(scheduler.config, seq_len, max_shift=1.15)
            retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
            with scheduler_on(pipe, scheduler):
                timesteps, _ = pipe.get_timesteps(steps, spec.strength, device)
                latents = pipe.prepare_latents(
                    init_image, timesteps[:1].repeat(1), 1, channels, spec.height, spec.width, dtype, device, generator
                )
        shape = (1, int(spec.height) // factor // 2, int(spec.width) // factor // 2)
        return Start(latents, timesteps, {"img_shape": shape})

    def row_inputs(self, track: Track) -> dict[str, Any]:
        import torch

        rows = track.rows
        latents = track.latents
        return {
            "hidden_states": torch.cat([latents] * rows) if rows > 1 else latents,
            "timestep": track.timestep.expand(rows).to(latents.dtype) / 1000,
            "encoder_hidden_states": list(track.conditioning.embeds),
            "img_shapes": [[track.state["img_shape"]]] * rows,
        }

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        embeds, mask = pad_text(inputs["encoder_hidden_states"])
        return pipe.transformer(
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"],
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=inputs["img_shapes"],
            attention_kwargs={},
            return_dict=False,
        )[0]

    def advance(self, track: Track, prediction: Any) -> Any:
        import torch

        if track.rows == 2:
            scale = DEFAULT_TRUE_CFG_SCALE if track.spec.true_cfg_scale is None else track.spec.true_cfg_scale
            text, negative = prediction.chunk(2)
            combined = negative + scale * (text - negative)
            text_norm = torch.norm(text, dim=-1, keepdim=True)
            combined_norm = torch.norm(combined, dim=-1, keepdim=True)
            prediction = combined * (text_norm / combined_norm)
        return track.scheduler.step(prediction, track.timestep, track.latents, return_dict=False)[0]

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        spec = tracks[0].spec  # a set shares its size
        vae = base.vae
        latents = torch.cat([t.latents for t in tracks])
        latents = base._unpack_latents(latents, spec.height, spec.width, base.vae_scale_factor).to(vae.dtype)
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
        image = vae.decode(latents / std + mean, return_dict=False)[0][:, :, 0]
        images = base.image_processor.postprocess(image, output_type="pil")
        return images, [False] * len(images)


def _token_count(base: Any, text: str) -> int:
    """The length `_get_qwen_prompt_embeds` tokenizes `text` to, template and truncation included."""
    template = base.prompt_template_encode
    limit = base.tokenizer_max_length + base.prompt_template_encode_start_idx
    return len(base.tokenizer(template.format(text), max_length=limit, truncation=True).input_ids)


def pad_text(rows: Sequence[Any]) -> tuple[Any, Any]:
    """Rows of text embeddings (1, tokens, dim) as one zero-padded batch and its mask, as the pipeline pads a
    batch of prompts; no mask when every row is full, as the pipeline passes none then."""
    import torch

    longest = max(row.shape[1] for row in rows)
    if all(row.shape[1] == longest for row in rows):
        return torch.cat(list(rows)), None
    padded = [torch.nn.functional.pad(row, (0, 0, 0, longest - row.shape[1])) for row in rows]
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=rows[0].device)
    for index, row in enumerate(rows):
        mask[index, : row.shape[1]] = 1
    return torch.cat(padded), mask
