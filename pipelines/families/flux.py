"""FLUX.1 (dev and schnell): a flow-matching transformer over packed latents with joint text-image attention.

As `FluxPipeline` and `FluxImg2ImgPipeline` run it: distilled guidance is a per-row embedding (`guidance_scale`,
where the transformer has `guidance_embeds`), and true CFG is a second, unconditional pass when a negative prompt
is given with `true_cfg_scale > 1`; here that pass is the item's second row of the shared call, [conditional,
unconditional], combined as `n + s * (c - n)`. Each item's scheduler gets its own sigmas and resolution shift
(`mu`). The text and image position ids are one 2-D tensor per call, not per row, and joint attention has no
text mask: items share a call only with the same latent size and `max_sequence_length` (`split`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from model_store.interface import IMG2IMG, TEXT2IMG

from .base import Conditioning, Start, StepInputs, Track, one_per_item, resolution_shift, scheduler_on

FLUX_CLASSES = {"FluxPipeline": TEXT2IMG, "FluxImg2ImgPipeline": IMG2IMG}
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s


def true_cfg(spec: StepInputs) -> bool:
    """The pipelines' `do_true_cfg`: a negative prompt and `true_cfg_scale > 1` (its default is 1.0)."""
    return spec.negative_prompt is not None and (spec.true_cfg_scale or 1.0) > 1


def text_length(spec: StepInputs) -> int:
    """The T5 prompt length: the request's `max_sequence_length`, else the pipelines' default."""
    return spec.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH


def flow_schedule(scheduler: Any, steps: int, image_seq_len: int, device: Any, flow_sigmas: bool = True) -> Any:
    """`retrieve_timesteps` with the pipelines' sigmas and resolution-dependent shift, on the item's scheduler
    (`flow_sigmas`: the pipeline defers to a scheduler's `use_flow_sigmas`, as FluxPipeline does; its image-to-image
    and Kontext pipelines do not)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    sigmas: Any = np.linspace(1.0, 1 / steps, steps)
    if flow_sigmas and getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = resolution_shift(scheduler.config, image_seq_len, max_shift=1.15)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    return timesteps


class Flux:
    """FLUX.1 text-to-image and image-to-image."""

    classes: Mapping[str, str] = FLUX_CLASSES

    def capable(self, configs: Any, task: str) -> bool:
        return configs.component("vae") == "AutoencoderKL" and configs.component("transformer") == (
            "FluxTransformer2DModel"
        )

    def rows(self, spec: StepInputs) -> int:
        return 2 if true_cfg(spec) else 1

    def split(self, spec: StepInputs) -> Hashable:
        return text_length(spec)  # T5 pads every prompt to this length

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        return one_per_item(specs, self.split)

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """Positive and negative prompts in one `encode_prompt` call: each text is encoded on its own rows. An
        absent second prompt is the first, as the pipeline's `prompt_2 or prompt` makes it."""
        import torch

        negatives = [spec for spec in specs if true_cfg(spec)]
        prompts = [spec.prompt for spec in specs] + [spec.negative_prompt or "" for spec in negatives]
        prompts_2 = [spec.prompt_2 or spec.prompt for spec in specs]
        prompts_2 += [spec.negative_prompt_2 or spec.negative_prompt or "" for spec in negatives]
        embeds, pooled, text_ids = base.encode_prompt(
            prompt=prompts,
            prompt_2=prompts_2,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=text_length(specs[0]),
        )
        result, negative = [], len(specs)
        for i, spec in enumerate(specs):
            rows = [i]
            if true_cfg(spec):
                rows.append(negative)
                negative += 1
            index = torch.tensor(rows, device=embeds.device)
            result.append(Conditioning(embeds[index], {"pooled_projections": pooled[index], "txt_ids": text_ids}))
        return result

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        import torch

        dtype = conditioning.embeds.dtype
        channels = pipe.transformer.config.in_channels // 4
        if spec.task == TEXT2IMG:
            latents, image_ids = pipe.prepare_latents(1, channels, spec.height, spec.width, dtype, device, generator)
            timesteps = flow_schedule(scheduler, spec.num_inference_steps, latents.shape[1], device)
            scheduler.set_begin_index(0)
        else:
            init_image = pipe.image_processor.preprocess(spec.image, height=spec.height, width=spec.width)
            init_image = init_image.to(dtype=torch.float32)
            factor = pipe.vae_scale_factor
            seq_len = (int(spec.height) // factor // 2) * (int(spec.width) // factor // 2)
            flow_schedule(scheduler, spec.num_inference_steps, seq_len, device, flow_sigmas=False)
            with scheduler_on(pipe, scheduler):
                timesteps, _ = pipe.get_timesteps(spec.num_inference_steps, spec.strength, device)
                first = timesteps[:1].repeat(1)
                latents, image_ids = pipe.prepare_latents(
                    init_image, first, 1, channels, spec.height, spec.width, dtype, device, generator
                )
        state: dict[str, Any] = {"img_ids": image_ids, "txt_ids": conditioning.added.pop("txt_ids")}
        if pipe.transformer.config.guidance_embeds:
            state["guidance"] = torch.full([self.rows(spec)], spec.guidance_scale, device=device, dtype=torch.float32)
        return Start(latents, timesteps, state)

    def row_inputs(self, track: Track) -> dict[str, Any]:
        import torch

        rows = track.rows
        latents = track.latents
        inputs = {
            "hidden_states": torch.cat([latents] * rows) if rows > 1 else latents,
            "timestep": track.timestep.expand(rows).to(latents.dtype) / 1000,
            "encoder_hidden_states": track.conditioning.embeds,
            "pooled_projections": track.conditioning.added["pooled_projections"],
        }
        if "guidance" in track.state:
            inputs["guidance"] = track.state["guidance"]
        return inputs

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        return pipe.transformer(
            **inputs,
            txt_ids=first.state["txt_ids"],
            img_ids=first.state["img_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

    def advance(self, track: Track, prediction: Any) -> Any:
        if track.rows == 2:
            text, negative = prediction.chunk(2)
            prediction = negative + track.spec.true_cfg_scale * (text - negative)
        return track.scheduler.step(prediction, track.timestep, track.latents, return_dict=False)[0]

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        import torch

        height, width = tracks[0].state.get("size", (tracks[0].spec.height, tracks[0].spec.width))  # a set's
        latents = unpack(torch.cat([t.latents for t in tracks]), height, width, base.vae_scale_factor)
        vae = base.vae
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        images = base.image_processor.postprocess(image, output_type="pil")
        return images, [False] * len(images)


def unpack(latents: Any, height: int, width: int, vae_scale_factor: int) -> Any:
    """Packed (batch, tokens, channels x 4) latents back to (batch, channels, h, w), as FluxPipeline unpacks them."""
    batch, _, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, height, width)
