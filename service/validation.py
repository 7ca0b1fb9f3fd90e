"""Request validation: domain request (`service.domain`) -> validated job (`Generation`, `CallJob`), or
INVALID_ARGUMENT naming every bad field in `google.rpc.BadRequest` details.

All checks happen here, once, before any work is queued. Defaults the client leaves out are the model's own:
the parameter defaults of the signature's pipeline (`ServedModel.default`).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_store.interface import EDIT, IMG2IMG, INPAINT, TEXT2IMG
from model_store.tags import shown
from pipelines.adapters import LORA, Adapter

from . import imaging
from .config import ServerConfig
from .domain import Params, TaskRequest
from .errors import FieldViolation, InvalidArgument, ReplyTooLarge
from .generation import Generation
from .registry import ModelRegistry, ServedModel

FALLBACK_STEPS = 50  # only for a pipeline whose signature has no default (diffusers' own default)
FALLBACK_GUIDANCE = 7.5
MIME_TYPES = {"png": imaging.PNG, "jpeg": imaging.JPEG, "webp": imaging.WEBP}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's configuration); every RPC, Call included, is held to it."""

    max_image_size: int
    max_steps: int
    max_images: int
    max_input_pixels: int
    max_pixel_steps: int = 2**31
    max_prompt_chars: int = 4096
    max_message_bytes: int = 64 << 20
    max_adapters_per_request: int = 8

    @classmethod
    def of(cls, config: ServerConfig) -> Limits:
        return cls(
            config.max_image_size,
            config.max_steps,
            config.max_images,
            config.max_input_pixels,
            config.max_pixel_steps,
            config.max_prompt_chars,
            config.max_message_bytes,
            config.max_adapters_per_request,
        )

    def check_budget(self, images: int, height: int, width: int, steps: int, field: str, bad: Violations) -> None:
        """The work and the reply a request asks for, before any of it is done: the pixel-steps budget, and a
        reply that must fit the message limit (PNG at worst a little over the raw pixels)."""
        pixel_steps = images * height * width * steps
        if pixel_steps > self.max_pixel_steps:
            bad.add(
                field,
                f"images x height x width x steps = {images} x {height} x {width} x {steps} = {pixel_steps} is over "
                f"the server's budget of {self.max_pixel_steps} (--max-pixel-steps)",
            )
        reply = images * (height * width * 3 * 1.01 + 4096)
        if reply > self.max_message_bytes:
            bad.too_large = (
                f"{images} images of {width}x{height} could make a reply of {reply / 2**20:.0f} MiB, over the "
                f"server's message limit of {self.max_message_bytes / 2**20:.0f} MiB: ask for fewer or smaller images"
            )

    def check_text(self, text: str | None, field: str, bad: Violations) -> None:
        if text is not None and len(text) > self.max_prompt_chars:
            bad.add(field, f"is {len(text)} characters long; the server's limit is {self.max_prompt_chars}")


class Violations:
    """Collects every field problem of a request, so the client learns them all at once.

    A value the client chose that breaks a documented limit is INVALID_ARGUMENT, and it is reported first: only a
    request whose every field is within its limits can be refused for the size of its reply (RESOURCE_EXHAUSTED).
    """

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self.too_large: str | None = None  # why the reply would not fit the message limit

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument.of(self.items)
        if self.too_large is not None:
            raise ReplyTooLarge(self.too_large)


def generation(request: TaskRequest, registry: ModelRegistry, limits: Limits) -> Generation:
    """TextToImage, ImageToImage, Inpaint and Edit: the common params, plus an input image (and for inpainting a
    mask of its size) or reference images where the task takes them."""
    served = registry.resolve(request.model)
    signature = served.signature_for(request.task)
    bad = Violations()
    image = mask = None
    if request.task in (IMG2IMG, INPAINT):
        image = decoded_image(request.image, "image", limits, bad)
    if request.task == INPAINT:
        mask = decoded_image(request.mask_image, "mask_image", limits, bad)
        if image is not None and mask is not None and image.size != mask.size:
            want, got = f"{image.width}x{image.height}", f"{mask.width}x{mask.height}"
            bad.add("mask_image", f"must be the size of image, {want}, got {got}")
    references = _references(request, served, signature.name, limits, bad) if request.task == EDIT else ()
    input_size = image.size if image else references[0].size if references else None
    fields = _params(request.params, served, signature.name, limits, bad, input_size=input_size)
    strength = _strength(request, served, signature.name, fields["num_inference_steps"], bad) if image else None
    fields.update(_more_texts(request, served, signature.name, bad))
    fields.update(_text_guidance(request.params, served, signature.name, bad))
    fields["cache_threshold"] = _cache(request.params, served, signature.name, bad)
    fields.update(_sdxl_conditioning(request.params, served, signature.name, fields, bad))
    fields.update(_control(request, served, limits, fields, bad))
    if request.task in (TEXT2IMG, EDIT) and not request.prompt.strip() and served.takes(signature.name)("prompt"):
        # Without a prompt the pipeline would silently make an unconditional image, at the client's cost.
        what = "the image to make" if request.task == TEXT2IMG else "the change to make"
        bad.add("prompt", f"is required: describe {what}")
    for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"):
        limits.check_text(getattr(request, name), name, bad)
    images, steps = fields["num_images"], fields["num_inference_steps"]
    limits.check_budget(images, fields["height"], fields["width"], steps, "params", bad)
    fields["loras"] = _loras(request.params.adapters, served, registry, limits, bad)
    fields["embeddings"] = _embeddings(
        served, request.prompt, request.negative_prompt, request.prompt_2, request.negative_prompt_2
    )
    bad.raise_if_any()
    return Generation(
        served=served,
        signature=signature,
        task=request.task,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        strength=strength,
        image=_resized(image, fields),
        mask_image=_resized(mask.convert("L") if mask else None, fields),
        references=references,
        warnings=served.prompt_warnings(request.prompt, request.negative_prompt),
        **fields,
    )


MAX_REFERENCES = 4  # reference images one Edit may send (Qwen-Image-Edit-Plus is trained on up to 3)


def _references(
    request: TaskRequest, served: ServedModel, signature: str, limits: Limits, bad: Violations
) -> tuple[Any, ...]:
    """An Edit's reference images, decoded, as the pipeline takes them (RGB, their own size): one, or several
    where the pipeline is made for several."""
    if not request.images:
        bad.add("images", "is required: send the image to edit (several where the model takes several)")
        return ()
    most = MAX_REFERENCES if served.takes_several_images(signature) else 1
    if len(request.images) > most:
        given = len(request.images)
        bad.add("images", f"{served.tag}'s {signature} takes at most {most} reference image(s), got {given}")
        return ()
    decoded = [decoded_image(data, f"images[{i}]", limits, bad) for i, data in enumerate(request.images)]
    return tuple(image for image in decoded if image is not None)


def _params(
    params: Params,
    served: ServedModel,
    signature: str,
    limits: Limits,
    bad: Violations,
    input_size: tuple[int, int] | None,
) -> dict[str, Any]:
    """Check GenerationParams; returns the Generation fields they decide.

    Height and width default to the input image's size (rounded down to a multiple of 8) or the model's default.
    """
    if input_size is not None:
        width0, height0 = (max(8, (side // 8) * 8) for side in input_size)
    else:
        height0, width0 = served.default_size(signature)
    height = params.height if params.height is not None else height0
    width = params.width if params.width is not None else width0
    # Only sizes the client chose are held to the rule; a default is the pipeline's own (even one such as
    # Lumina2's tiny 4x4), and a pipeline accepts its own defaults.
    for name, value, given in (("params.height", height, params.height), ("params.width", width, params.width)):
        if given is not None and (value < 8 or value > limits.max_image_size or value % 8):
            bad.add(name, f"must be a multiple of 8 between 8 and {limits.max_image_size}, got {value}")
    steps = (
        params.steps if params.steps is not None else served.default(signature, "num_inference_steps", FALLBACK_STEPS)
    )
    if not 1 <= steps <= limits.max_steps:
        bad.add("params.num_inference_steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    guidance = (
        params.guidance_scale
        if params.guidance_scale is not None
        else served.default(signature, "guidance_scale", FALLBACK_GUIDANCE)
    )
    if not math.isfinite(guidance):
        bad.add("params.guidance_scale", f"must be a finite number, got {guidance}")
    if params.eta is not None:
        if not math.isfinite(params.eta):
            bad.add("params.eta", f"must be a finite number, got {params.eta}")
        elif not served.takes(signature)("eta"):
            bad.add("params.eta", f"{served.tag}'s {signature} does not take eta")
    num_images = params.num_images or 1
    if num_images > limits.max_images:
        bad.add("params.num_images", f"must be between 1 and {limits.max_images}, got {num_images}")
    if params.scheduler and params.scheduler not in served.defaults.compatible_schedulers:
        choices = ", ".join(served.defaults.compatible_schedulers)
        bad.add("params.scheduler", f"unknown scheduler {params.scheduler!r}; choose one of: {choices}")
    if params.quality is not None and not 1 <= params.quality <= 100:
        bad.add("params.quality", f"must be between 1 and 100, got {params.quality}")
    return {
        "num_inference_steps": steps,
        "guidance_scale": float(guidance),
        "height": height,
        "width": width,
        "size_given": params.height is not None or params.width is not None,
        "seed": params.seed if params.seed is not None else secrets.randbits(63),
        "num_images": num_images,
        "scheduler": params.scheduler,
        "eta": params.eta,
        "mime_type": mime_type_of(params.output_format, "params.output_format", bad),
        "quality": params.quality,
    }


def _more_texts(request: TaskRequest, served: ServedModel, signature: str, bad: Violations) -> dict[str, Any]:
    """The prompts of a second and third text encoder (SDXL, SD3, FLUX); refused by models that have none."""
    takes = served.takes(signature)
    names = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
    for name in names:
        if getattr(request, name) is not None and not takes(name):
            bad.add(name, f"{served.tag}'s {signature} does not take {name} (it has no such text encoder)")
    return {name: getattr(request, name) for name in names}


MAX_SEQUENCE_LENGTH = 512  # T5's (FLUX and SD3 refuse more); a model whose own default is longer allows that


def _text_guidance(params: Params, served: ServedModel, signature: str, bad: Violations) -> dict[str, Any]:
    """True CFG's scale and the long text encoder's prompt length: the request's, else the pipeline's defaults
    where it takes them; refused by models that do not."""
    takes = served.takes(signature)
    resolved: dict[str, Any] = {}
    scale = params.true_cfg_scale
    if scale is not None:
        if not takes("true_cfg_scale"):
            bad.add("params.true_cfg_scale", f"{served.tag}'s {signature} does not take true_cfg_scale")
        elif not math.isfinite(scale):
            bad.add("params.true_cfg_scale", f"must be a finite number, got {scale}")
        else:
            resolved["true_cfg_scale"] = float(scale)
    elif takes("true_cfg_scale") and served.parameters.get(signature) is not None:
        resolved["true_cfg_scale"] = float(served.default(signature, "true_cfg_scale", 1.0))
    length = params.max_sequence_length
    if length is not None and not takes("max_sequence_length"):
        bad.add("params.max_sequence_length", f"{served.tag}'s {signature} does not take max_sequence_length")
    elif takes("max_sequence_length") and served.parameters.get(signature) is not None:
        default = int(served.default(signature, "max_sequence_length", MAX_SEQUENCE_LENGTH))
        most = max(MAX_SEQUENCE_LENGTH, default)
        if length is not None and not 1 <= length <= most:
            bad.add("params.max_sequence_length", f"must be between 1 and {most}, got {length}")
        resolved["max_sequence_length"] = length if length is not None else default
    elif length is not None:
        resolved["max_sequence_length"] = length
    return resolved


def _cache(params: Params, served: ServedModel, signature: str, bad: Violations) -> float | None:
    """The request's First Block Cache threshold; else the model's default where the signature offers a cache;
    `method: "none"` turns it off."""
    if params.cache is None:
        return served.default_cache_threshold if served.cacheable(signature) else None
    method, threshold = params.cache
    if method == "none":
        return None
    if method != "first_block":
        bad.add("params.cache.method", f"must be first_block or none, got {shown(method)}")
        return None
    if not served.cacheable(signature):
        bad.add(
            "params.cache.method",
            f"{served.tag}'s {signature} offers no first_block cache: diffusers' hook runs in the FLUX.1 "
            "text-to-image and Qwen-Image pipelines, served on the step engine",
        )
        return None
    if not math.isfinite(threshold) or threshold < 0:
        bad.add("params.cache.threshold", f"must be a finite number of at least 0, got {threshold}")
        return None
    return float(threshold)


SIZE_CONDITIONING_MAX = 16384  # pixels: far above any training size, small enough to stay meaningful


def _sdxl_conditioning(
    params: Params, served: ServedModel, signature: str, fields: dict[str, Any], bad: Violations
) -> dict[str, Any]:
    """SDXL micro-conditioning and the refiner's aesthetic scores; refused by models that do not take them."""
    takes = served.takes(signature)
    resolved: dict[str, Any] = {}
    sizes = params.size_conditioning
    if sizes.given():
        if not takes("original_size"):
            bad.add("params.size_conditioning", f"{served.tag}'s {signature} does not take size conditioning")
        for name, value in vars(sizes).items():
            low = 0 if name.startswith("crop") else 8
            if value is not None and not low <= value <= SIZE_CONDITIONING_MAX:
                field = f"params.size_conditioning.{name}"
                bad.add(field, f"must be between {low} and {SIZE_CONDITIONING_MAX}, got {value}")
        height, width = fields["height"], fields["width"]
        # Absent parts take the pipeline's defaults: the output size, and a crop at (0, 0).
        if sizes.original_height is not None or sizes.original_width is not None:
            resolved["original_size"] = (sizes.original_height or height, sizes.original_width or width)
        if sizes.crop_top is not None or sizes.crop_left is not None:
            resolved["crops_coords_top_left"] = (sizes.crop_top or 0, sizes.crop_left or 0)
        if sizes.target_height is not None or sizes.target_width is not None:
            resolved["target_size"] = (sizes.target_height or height, sizes.target_width or width)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        value = getattr(params, name)
        if value is None:
            continue
        if not takes(name):
            bad.add(f"params.{name}", f"{served.tag}'s {signature} does not take {name}")
        elif not math.isfinite(value):
            bad.add(f"params.{name}", f"must be a finite number, got {value}")
        resolved[name] = value
    return resolved


def _control(
    request: TaskRequest, served: ServedModel, limits: Limits, fields: dict[str, Any], bad: Violations
) -> dict[str, Any]:
    """ControlNet inputs: one conditioning image per ControlNet, its scales and guidance window."""
    nets, params = served.control_inputs, request.params
    if not nets:
        for name, given in (
            ("control_images", request.control_images),
            ("params.control_scales", params.control_scales),
            ("params.control_guidance_start", params.control_guidance_start is not None),
            ("params.control_guidance_end", params.control_guidance_end is not None),
        ):
            if given:
                bad.add(name, f"{served.tag} has no ControlNet")
        return {}
    if len(request.control_images) != nets:
        bad.add(
            "control_images",
            f"{served.tag} has {nets} ControlNet(s): send {nets} image(s), got {len(request.control_images)}",
        )
    images = tuple(
        _resized(decoded_image(data, f"control_images[{i}]", limits, bad), fields)
        for i, data in enumerate(request.control_images)
    )
    scales = params.control_scales
    if scales and len(scales) != nets:
        bad.add("params.control_scales", f"give one scale per ControlNet ({nets}), or none; got {len(scales)}")
    if not all(math.isfinite(scale) for scale in scales):
        bad.add("params.control_scales", f"must be finite numbers, got {list(scales)}")
    window = {
        "control_guidance_start": params.control_guidance_start,
        "control_guidance_end": params.control_guidance_end,
    }
    for name, value in window.items():
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            bad.add(f"params.{name}", f"must be a number in [0, 1], got {value}")
    start, end = window["control_guidance_start"], window["control_guidance_end"]
    if start is not None and end is not None and not start < end:
        bad.add("params.control_guidance_start", f"must be below control_guidance_end ({end}), got {start}")
    return {
        "control_images": images,
        "control_scales": tuple(scales),
        **{k: v for k, v in window.items() if v is not None},
    }


MAX_ADAPTER_WEIGHT = 10.0


def _loras(
    requested: Sequence[tuple[str, float]],
    served: ServedModel,
    registry: ModelRegistry,
    limits: Limits,
    bad: Violations,
) -> tuple[Adapter, ...]:
    """The LoRAs a request names, each at its weight: known to this model, finite, in range, once each, at most
    `--max-adapters-per-request` of them. Linear in the request (the model's adapters are listed once, and only
    when a name is unknown)."""
    if len(requested) > limits.max_adapters_per_request:
        bad.add(
            "params.adapters",
            f"names {len(requested)} adapters; at most {limits.max_adapters_per_request} (--max-adapters-per-request)",
        )
        return ()
    loras = []
    seen: set[str] = set()
    known: str | None = None
    for index, (name, weight) in enumerate(requested):
        field = f"params.adapters[{index}]"
        adapter = served.adapters.get(name)
        if name in seen:
            bad.add(f"{field}.name", f"{shown(name)} is named twice")
        elif adapter is None and name in registry.other_bases:
            bad.add(
                f"{field}.name",
                f"{shown(name)} is an adapter for {registry.other_bases[name]}, not {served.model.name}",
            )
        elif adapter is None:
            if known is None:
                names = [a.name for a in served.adapters.all() if a.kind == LORA]
                known = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") or "none"
            bad.add(f"{field}.name", f"{shown(name)} is not an adapter of {served.model.name}; its adapters: {known}")
        elif adapter.kind != LORA:
            bad.add(f"{field}.name", f"{name} is an embedding: use its token {adapter.token} in the prompt")
        if not (math.isfinite(weight) and -MAX_ADAPTER_WEIGHT <= weight <= MAX_ADAPTER_WEIGHT):
            bad.add(
                f"{field}.weight",
                f"must be a finite number in [-{MAX_ADAPTER_WEIGHT:g}, {MAX_ADAPTER_WEIGHT:g}], got {weight}",
            )
        seen.add(name)
        if adapter is not None and adapter.kind == LORA:
            loras.append(dataclasses.replace(adapter, weight=float(weight)))
    # One order for one set: items naming the same adapters batch together whatever order they listed them in.
    return tuple(sorted(loras, key=lambda a: a.name))


def _embeddings(served: ServedModel, *texts: str | None) -> tuple[Adapter, ...]:
    """The embeddings whose tokens the prompts use: the worker makes sure they are loaded."""
    joined = " ".join(text for text in texts if text)
    return tuple(
        sorted((a for a in served.adapters.embeddings() if a.token and a.token in joined), key=lambda a: a.name)
    )


def mime_type_of(output_format: str, field: str, bad: Violations) -> str:
    if output_format not in MIME_TYPES:
        bad.add(field, f"unknown output format {output_format.lstrip('#')}")
        return imaging.PNG
    return MIME_TYPES[output_format]


# When a pipeline's signature has no default (diffusers' own: SD img2img 0.8, inpaint 1.0, SDXL inpaint 0.9999).
DEFAULT_STRENGTH = {IMG2IMG: 0.8, INPAINT: 1.0}


def _strength(request: TaskRequest, served: ServedModel, signature: str, steps: int, bad: Violations) -> float:
    """The strength to run with: the request's, else the pipeline's own default (both engines pass it)."""
    strength = request.strength
    if strength is not None and not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        bad.add("strength", f"must be a finite number in [0, 1], got {strength}")
        return strength
    effective = float(
        served.default(signature, "strength", DEFAULT_STRENGTH[request.task]) if strength is None else strength
    )
    if int(steps * effective) < 1:  # diffusers would run zero steps and fail on an empty batch
        field = "strength" if strength is not None else "params.num_inference_steps"
        bad.add(field, f"num_inference_steps x strength = {steps} x {effective:g} runs no step; raise either")
    return effective


def decoded_image(data: bytes | None, field: str, limits: Limits, bad: Violations) -> Any:
    """Decode an input image (None, with a violation, when it is missing or bad)."""
    if not data:
        bad.add(field, "is required: image data is empty")
        return None
    try:
        return imaging.decode(data, max_pixels=limits.max_input_pixels)
    except imaging.ImageDecodeError as exc:
        bad.add(field, str(exc))
        return None


def _resized(image: Any, fields: dict[str, Any]) -> Any:
    """Resize an input to the requested output size, explicitly (diffusers would do it silently)."""
    if image is None:
        return None
    size = (fields["width"], fields["height"])
    return image if image.size == size else image.resize(size, imaging.RESAMPLE)
