"""Request validation: proto request -> domain job (`Generation`, `CallJob`), or INVALID_ARGUMENT naming every
bad field in `google.rpc.BadRequest` details.

All checks happen here, once, before any work is queued.
"""

from __future__ import annotations

import inspect
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from model_store.signatures import IMG2IMG, INPAINT, TEXT2IMG

from . import imaging
from .config import ServerConfig
from .errors import FieldViolation, InvalidArgument, Unimplemented
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generation import CallJob, Generation
from .registry import ModelRegistry, ServedModel

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
MIME_TYPES = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: imaging.PNG,
    pb.OUTPUT_FORMAT_PNG: imaging.PNG,
    pb.OUTPUT_FORMAT_JPEG: imaging.JPEG,
    pb.OUTPUT_FORMAT_WEBP: imaging.WEBP,
}
# Set by the server from the request's seed and stream: a Call may not pass them.
RESERVED_CALL_ARGUMENTS = ("generator", "callback_on_step_end", "callback", "return_dict")


@dataclass(frozen=True)
class Limits:
    max_image_size: int
    max_steps: int
    max_images: int
    max_input_pixels: int

    @classmethod
    def of(cls, config: ServerConfig) -> Limits:
        return cls(config.max_image_size, config.max_steps, config.max_images, config.max_input_pixels)


class Violations:
    """Collects every field problem of a request, so the client learns them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument.of(self.items)


def text_to_image(request: pb.TextToImageRequest, registry: ModelRegistry, limits: Limits) -> Generation:
    served = registry.resolve(request.model)
    signature = served.signature_for(TEXT2IMG)
    bad = Violations()
    fields = _params(request.params, served, limits, bad, input_size=None)
    bad.raise_if_any()
    return Generation(
        served=served,
        signature=signature,
        task=TEXT2IMG,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        warnings=served.prompt_warnings(request.prompt, request.negative_prompt),
        **fields,
    )


def image_to_image(request: pb.ImageToImageRequest, registry: ModelRegistry, limits: Limits) -> Generation:
    return _image_task(IMG2IMG, request, None, registry, limits)


def inpaint(request: pb.InpaintRequest, registry: ModelRegistry, limits: Limits) -> Generation:
    return _image_task(INPAINT, request, request.mask_image, registry, limits)


def _image_task(
    task: str,
    request: pb.ImageToImageRequest | pb.InpaintRequest,
    proto_mask: pb.Image | None,
    registry: ModelRegistry,
    limits: Limits,
) -> Generation:
    """ImageToImage and Inpaint: an input image (and for inpainting a mask of its size) plus the common params."""
    served = registry.resolve(request.model)
    signature = served.signature_for(task)
    bad = Violations()
    image = _image(request.image, "image", limits, bad)
    mask = _image(proto_mask, "mask_image", limits, bad) if proto_mask is not None else None
    if image is not None and mask is not None and image.size != mask.size:
        want, got = f"{image.width}x{image.height}", f"{mask.width}x{mask.height}"
        bad.add("mask_image", f"must be the size of image, {want}, got {got}")
    fields = _params(request.params, served, limits, bad, input_size=image.size if image else None)
    strength = _strength(request, task, fields["num_inference_steps"], bad)
    bad.raise_if_any()
    return Generation(
        served=served,
        signature=signature,
        task=task,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        strength=strength,
        image=_resized(image, fields),
        mask_image=_resized(mask.convert("L") if mask else None, fields),
        warnings=served.prompt_warnings(request.prompt, request.negative_prompt),
        **fields,
    )


def call(request: pb.CallRequest, registry: ModelRegistry, limits: Limits) -> CallJob:
    served = registry.resolve(request.model)
    signatures = served.model.signatures
    if request.signature not in signatures:
        names = ", ".join(sorted(signatures))
        raise Unimplemented(f"model {served.tag} has no signature {request.signature!r}; its signatures: {names}")
    signature = signatures[request.signature]
    parameters = served.parameters(signature.name)
    bad = Violations()
    arguments = json_format.MessageToDict(request.arguments) if request.HasField("arguments") else {}
    checked = {}
    for name, value in arguments.items():
        field = f"arguments.{name}"
        if name in RESERVED_CALL_ARGUMENTS:
            bad.add(field, "is set by the server (use `seed` for the generator)")
            continue
        if parameters is not None and name not in parameters:
            bad.add(field, f"{signature.name} has no argument {name!r}")
            continue
        try:
            checked[name] = coerce(value, parameters.get(name) if parameters else None)
        except TypeError as exc:
            bad.add(field, str(exc))
    images = {}
    for name, proto_image in request.images.items():
        field = f"images[{name}]"
        if parameters is not None and name not in parameters:
            bad.add(field, f"{signature.name} has no argument {name!r}")
            continue
        if name in checked:
            bad.add(field, f"{name!r} is also given in arguments")
            continue
        decoded = _image(proto_image, field, limits, bad)
        if decoded is not None:
            images[name] = decoded
    if request.output_format not in MIME_TYPES:
        bad.add("output_format", f"unknown output format {request.output_format}")
    bad.raise_if_any()
    return CallJob(
        served=served,
        signature=signature,
        arguments=checked,
        images=images,
        seed=request.seed if request.HasField("seed") else secrets.randbits(63),
        mime_type=MIME_TYPES.get(request.output_format, imaging.PNG),
    )


def _params(
    params: pb.GenerationParams,
    served: ServedModel,
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
        width0, height0 = served.defaults.width, served.defaults.height
    height = params.height if params.HasField("height") else height0
    width = params.width if params.HasField("width") else width0
    for name, value in (("params.height", height), ("params.width", width)):
        if value < 8 or value > limits.max_image_size or value % 8:
            bad.add(name, f"must be a multiple of 8 between 8 and {limits.max_image_size}, got {value}")
    steps = params.num_inference_steps if params.HasField("num_inference_steps") else DEFAULT_STEPS
    if not 1 <= steps <= limits.max_steps:
        bad.add("params.num_inference_steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    guidance = params.guidance_scale if params.HasField("guidance_scale") else DEFAULT_GUIDANCE
    if not math.isfinite(guidance):
        bad.add("params.guidance_scale", f"must be a finite number, got {guidance}")
    eta = params.eta if params.HasField("eta") else None
    if eta is not None and not math.isfinite(eta):
        bad.add("params.eta", f"must be a finite number, got {eta}")
    num_images = params.num_images or 1
    if num_images > limits.max_images:
        bad.add("params.num_images", f"must be between 1 and {limits.max_images}, got {num_images}")
    if params.scheduler and params.scheduler not in served.defaults.compatible_schedulers:
        choices = ", ".join(served.defaults.compatible_schedulers)
        bad.add("params.scheduler", f"unknown scheduler {params.scheduler!r}; choose one of: {choices}")
    if params.output_format not in MIME_TYPES:
        bad.add("params.output_format", f"unknown output format {params.output_format}")
    quality = params.quality if params.HasField("quality") else None
    if quality is not None and not 1 <= quality <= 100:
        bad.add("params.quality", f"must be between 1 and 100, got {quality}")
    seed = params.seed if params.HasField("seed") else secrets.randbits(63)
    return {
        "num_inference_steps": steps,
        "guidance_scale": float(guidance),
        "height": height,
        "width": width,
        "seed": seed,
        "num_images": num_images,
        "scheduler": params.scheduler,
        "eta": eta,
        "mime_type": MIME_TYPES.get(params.output_format, imaging.PNG),
        "quality": quality,
    }


# diffusers' defaults: the denoising steps run are int(num_inference_steps * strength)
DEFAULT_STRENGTH = {IMG2IMG: 0.8, INPAINT: 1.0}


def _strength(
    request: pb.ImageToImageRequest | pb.InpaintRequest, task: str, steps: int, bad: Violations
) -> float | None:
    strength = request.strength if request.HasField("strength") else None
    if strength is not None and not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        bad.add("strength", f"must be a finite number in [0, 1], got {strength}")
        return strength
    effective = DEFAULT_STRENGTH[task] if strength is None else strength
    if int(steps * effective) < 1:  # diffusers would run zero steps and fail on an empty batch
        field = "strength" if strength is not None else "params.num_inference_steps"
        bad.add(field, f"num_inference_steps x strength = {steps} x {effective:g} runs no step; raise either")
    return strength


def _image(image: pb.Image, field: str, limits: Limits, bad: Violations) -> Any:
    """Decode an input image (None, with a violation, when it is missing or bad)."""
    if not image.data:
        bad.add(field, "is required: image data is empty")
        return None
    try:
        return imaging.decode(image.data, max_pixels=limits.max_input_pixels)
    except imaging.ImageDecodeError as exc:
        bad.add(field, str(exc))
        return None


def _resized(image: Any, fields: dict[str, Any]) -> Any:
    """Resize an input to the requested output size, explicitly (diffusers would do it silently)."""
    if image is None:
        return None
    size = (fields["width"], fields["height"])
    return image if image.size == size else image.resize(size, imaging.RESAMPLE)


def coerce(value: Any, parameter: inspect.Parameter | None) -> Any:
    """Check a Struct value against a method parameter; integral numbers become ints where ints are expected.

    Struct numbers are all doubles, so `4.0` for `num_inference_steps: int` is accepted as 4; a string where a
    number is expected is refused. Parameters with no usable annotation or default accept any JSON value.
    """
    expected = _expected_types(parameter)
    if not expected or value is None:
        return value
    if isinstance(value, bool):
        if bool in expected:
            return value
    elif isinstance(value, float):
        if int in expected and value.is_integer():
            return int(value)
        if float in expected:
            return value
    elif type(value) in expected:
        return value
    wanted = " or ".join(sorted(t.__name__ for t in expected))
    raise TypeError(f"must be {wanted}, got {type(value).__name__} {value!r}")


_TYPE_WORDS = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list": list,
    "List": list,
    "dict": dict,
    "Dict": dict,
}


def _expected_types(parameter: inspect.Parameter | None) -> set[type]:
    """Types a JSON value may have for this parameter; empty when it cannot be told (anything goes)."""
    if parameter is None:
        return set()
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    if annotation is inspect.Parameter.empty:
        default = parameter.default
        kind = type(default)
        return {kind} if kind in (int, float, str, bool) else set()
    words = set(re.findall(r"\w+", text))  # the names in an annotation such as "int | list[str] | None"
    if words & {"Any", "Tensor", "Image", "ndarray", "PipelineImageInput", "Callable", "object"}:
        return set()
    types = {t for w, t in _TYPE_WORDS.items() if w in words}
    if float in types:
        types.add(int)  # a float parameter takes integral numbers too
    return types
