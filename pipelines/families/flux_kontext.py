"""FLUX.1 Kontext: instruction editing (task `edit`) on FLUX's transformer, as `FluxKontextPipeline` runs it.

Everything of `Flux` holds (distilled guidance per row, true CFG as a second row); what Kontext adds is the
reference image. It is resized to the preferred ~1 MP resolution nearest its aspect ratio, encoded once, and
its packed latents ride after the item's own latents in every denoiser call, with position ids whose first
axis is 1; the prediction for them is dropped. The output size is the request's aspect ratio at `max_area`
(1 MP), whatever its size (a square without one, not the reference's). A reference's size fixes its tokens
and ids, which are one tensor per call, so items share a call only with references of one size (`split`),
besides the latent size and text length.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from model_store.interface import EDIT

from .base import Conditioning, Start, StepInputs, Track
from .flux import Flux, flow_schedule

KONTEXT_CLASSES = {"FluxKontextPipeline": EDIT}
MAX_AREA = 1024**2  # FluxKontextPipeline.__call__'s


class FluxKontext(Flux):
    """FLUX.1 Kontext editing with one reference image."""

    classes: Mapping[str, str] = KONTEXT_CLASSES

    def split(self, spec: StepInputs) -> Hashable:
        return (super().split(spec), spec.references[0].size if spec.references else None)

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        import torch

        default = pipe.default_sample_size * pipe.vae_scale_factor  # a square, as the pipeline's call without a size
        height, width = output_size(pipe, *((spec.height, spec.width) if spec.size_given else (default, default)))
        image = reference(pipe, spec.references[0])
        channels = pipe.transformer.config.in_channels // 4
        dtype = conditioning.embeds.dtype
        latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
            image, 1, channels, height, width, dtype, device, generator
        )
        timesteps = flow_schedule(scheduler, spec.num_inference_steps, latents.shape[1], device, flow_sigmas=False)
        scheduler.set_begin_index(0)
        state: dict[str, Any] = {
            "img_ids": torch.cat([latent_ids, image_ids], dim=0),
            "txt_ids": conditioning.added.pop("txt_ids"),
            "image_latents": image_latents,
            "size": (height, width),
        }
        if pipe.transformer.config.guidance_embeds:
            state["guidance"] = torch.full([self.rows(spec)], spec.guidance_scale, device=device, dtype=torch.float32)
        return Start(latents, timesteps, state)

    def row_inputs(self, track: Track) -> dict[str, Any]:
        import torch

        inputs = super().row_inputs(track)
        with_reference = torch.cat([track.latents, track.state["image_latents"]], dim=1)
        inputs["hidden_states"] = torch.cat([with_reference] * track.rows) if track.rows > 1 else with_reference
        return inputs

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        return super().denoise(pipe, inputs, first)[:, : first.latents.shape[1]]


def output_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The pipeline's own output size: the requested aspect ratio at `MAX_AREA`, in multiples of the packing."""
    multiple = pipe.vae_scale_factor * 2
    aspect = width / height
    return (
        round((MAX_AREA / aspect) ** 0.5) // multiple * multiple,
        round((MAX_AREA * aspect) ** 0.5) // multiple * multiple,
    )


def reference(pipe: Any, image: Any) -> Any:
    """The reference as the pipeline preprocesses it: resized to the preferred Kontext resolution nearest its
    aspect ratio (`_auto_resize`, on by default), in multiples of the packing."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    multiple = pipe.vae_scale_factor * 2
    image_height, image_width = pipe.image_processor.get_default_height_width(image)
    aspect = image_width / image_height
    _, image_width, image_height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    image_width, image_height = image_width // multiple * multiple, image_height // multiple * multiple
    image = pipe.image_processor.resize(image, image_height, image_width)
    return pipe.image_processor.preprocess(image, image_height, image_width)
