"""Image encoding and decoding at the edge: output formats, PNG text chunks, input sniffing and limits."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

PNG, JPEG, WEBP = "image/png", "image/jpeg", "image/webp"
_PIL_FORMATS = {PNG: "PNG", JPEG: "JPEG", WEBP: "WEBP"}
# zlib level 1: ~2x faster than Pillow's default 6 on 512x512 outputs for a few % more bytes (FACTS.md).
PNG_COMPRESS_LEVEL = 1
DEFAULT_QUALITY = 90
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime_type: str
    width: int
    height: int


def encode(
    image: Image.Image,
    mime_type: str = PNG,
    *,
    quality: int | None = None,
    text: Mapping[str, str] | None = None,
) -> EncodedImage:
    """Encode an output image. PNGs carry `text` as tEXt chunks so the image describes how it was made."""
    buffer = io.BytesIO()
    fmt = _PIL_FORMATS[mime_type]
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
    else:
        rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
        rgb.save(buffer, format=fmt, quality=quality or DEFAULT_QUALITY)
    return EncodedImage(buffer.getvalue(), mime_type, image.width, image.height)


class ImageDecodeError(ValueError):
    """Input bytes are not an image we accept; the message is safe to show the client."""


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an input image to RGB, refusing empty data, unknown formats and decompression bombs."""
    if not data:
        raise ImageDecodeError("image data is empty")
    try:
        with warnings.catch_warnings():  # Pillow's own, looser bomb limit warns first; ours is checked just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height}, more than the limit of {max_pixels} pixels")
            if probe.format not in ("PNG", "JPEG", "WEBP"):
                raise ImageDecodeError(f"image format {probe.format} is not accepted; send PNG, JPEG or WebP")
            probe.load()
            upright = ImageOps.exif_transpose(probe)  # a phone photo is stored sideways, with an EXIF note
            return _to_8_bit(upright).convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:  # its message quotes a Python object's repr: say what it means instead
        raise ImageDecodeError("cannot decode image: the data is not a PNG, JPEG or WebP image") from None
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise ImageDecodeError(f"cannot decode image: {exc}") from None


def mask_from_alpha(data: bytes, *, max_pixels: int) -> bytes:
    """OpenAI's mask (an image whose transparent pixels mark what to repaint) as diffusers' (white repaints, black
    keeps), PNG-encoded, so that the shared validation reads it as any other mask. 255 - alpha: a half-transparent
    pixel is half repainted. Refused as `decode` refuses, and without an alpha channel."""
    if not data:
        raise ImageDecodeError("image data is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as probe:
            if probe.width * probe.height > max_pixels:
                raise ImageDecodeError(
                    f"image is {probe.width}x{probe.height}, more than the limit of {max_pixels} pixels"
                )
            if "A" not in probe.getbands() and "transparency" not in probe.info:
                raise ImageDecodeError("has no alpha channel: send a PNG whose transparent pixels mark what to repaint")
            alpha = probe.convert("RGBA").getchannel("A")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image: the data is not a PNG, JPEG or WebP image") from None
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    buffer = io.BytesIO()
    ImageOps.invert(alpha).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (16-bit PNGs) to 8 bits by scale, not by clipping (which turns them white)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L"):
        return image
    import numpy as np

    pixels = np.asarray(image, dtype=np.uint32)
    top = 65535 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255
    return Image.fromarray((pixels * 255 // top).astype(np.uint8), "L")


def read_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (to check what an output image says about itself)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


# Stable Diffusion latent channels -> RGB: a fixed linear approximation, far cheaper than the VAE.
_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def latent_preview(latents: Any) -> Image.Image | None:
    """A small RGB picture of one item's latents (C, h, w) through a fixed linear map; None unless 4 channels."""
    import torch

    if latents is None or getattr(latents, "ndim", 0) != 3 or latents.shape[0] != len(_LATENT_RGB):
        return None
    factors = torch.tensor(_LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,ck->hwk", latents.detach().float().cpu(), factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


VIDEO_OUTPUTS = ("frames", "videos", "video")  # output names diffusers' video pipelines use
FRAMES_PER_SECOND = 8  # diffusers' export_to_video default


def video_frames(name: str, value: Any) -> list[list[Image.Image]]:
    """The videos in a pipeline output, each as its frames in order: a list (batch) of lists of PIL frames, or an
    array of shape (batch, frames, ...) / (frames, ...) under a video output name. Empty when it is not video."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        if all(v and all(isinstance(f, Image.Image) for f in v) for v in value):
            return [list(v) for v in value]
        return []
    shape = getattr(value, "shape", None)
    if name not in VIDEO_OUTPUTS or shape is None or len(shape) not in (4, 5):
        return []
    import numpy as np

    array = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if array.ndim == 4:
        array = array[None]
    if array.shape[2] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):  # (batch, frames, C, H, W)
        array = array.transpose(0, 1, 3, 4, 2)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [
        [Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame) for frame in video] for video in array
    ]


def animated_webp(frames: list[Image.Image], fps: int = FRAMES_PER_SECOND) -> bytes:
    """One video's frames as an animated WebP (lossless, looping)."""
    buffer = io.BytesIO()
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(
        buffer, format="WEBP", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0, lossless=True
    )
    return buffer.getvalue()
