"""Turning pipeline outputs into response messages: encoded images, a JSON Struct of other outputs, previews.

Runs on the encode thread pool (or, for previews, the worker thread): never on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from batching.diffusers_runner import CallOutput, ItemOutput

from . import imaging
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generation import CallJob, Generation

MAX_LISTED_VALUES = 65536  # larger arrays are summarised, not sent
NSFW_OUTPUT = "nsfw_content_detected"
# Stable Diffusion latent channels -> RGB: a fixed linear approximation, far cheaper than the VAE.
_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def image_message(image: Image.Image, mime_type: str, quality: int | None, text: Mapping[str, str]) -> pb.Image:
    encoded = imaging.encode(image, mime_type, quality=quality, text=text)
    return pb.Image(data=encoded.data, mime_type=encoded.mime_type, width=encoded.width, height=encoded.height)


def generated_images(job: Generation, outputs: Sequence[ItemOutput]) -> list[pb.GeneratedImage]:
    return [
        pb.GeneratedImage(
            image=image_message(output.image, job.mime_type, job.quality, job.describe(seed)),
            seed=seed,
            nsfw_content_detected=output.nsfw,
        )
        for seed, output in zip(job.seeds(), outputs)
    ]


def call_response(job: CallJob, output: CallOutput) -> pb.CallResponse:
    """Images (PIL, alone or in lists) become GeneratedImages; everything else goes into the outputs Struct."""
    images: list[Image.Image] = []
    others: dict[str, Any] = {}
    for name, value in output.values.items():
        found = _images_in(value)
        if found:
            images += found
        elif name != NSFW_OUTPUT:
            others[name] = jsonable(value)
    flags = output.values.get(NSFW_OUTPUT)
    flags = list(flags) if isinstance(flags, (list, tuple)) and len(flags) == len(images) else [False] * len(images)
    text = job.describe(job.seed)
    response = pb.CallResponse(
        model=job.served.tag,
        images=[
            pb.GeneratedImage(
                image=image_message(image, job.mime_type, None, text), seed=job.seed, nsfw_content_detected=bool(flag)
            )
            for image, flag in zip(images, flags)
        ],
    )
    response.outputs.update(others)
    return response


def _images_in(value: Any) -> list[Image.Image]:
    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Image.Image) for v in value):
        return list(value)
    return []


def jsonable(value: Any) -> Any:
    """A Struct-compatible form of an output value; big arrays are summarised instead of sent."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "tolist"):
        size = 1
        for side in shape:
            size *= int(side)
        if size <= MAX_LISTED_VALUES:
            data = value.detach().cpu() if hasattr(value, "detach") else value
            return data.tolist()
        return f"<array of shape {tuple(int(s) for s in shape)} omitted>"
    return str(value)


def latent_preview(latents: Any) -> pb.Image | None:
    """A small PNG of one item's latents (C, h, w) through a fixed latent->RGB map; None if not 4 channels."""
    import torch

    if latents is None or getattr(latents, "ndim", 0) != 3 or latents.shape[0] != len(_LATENT_RGB):
        return None
    factors = torch.tensor(_LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,ck->hwk", latents.detach().float().cpu(), factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return image_message(Image.fromarray(pixels, "RGB"), imaging.PNG, None, {})
