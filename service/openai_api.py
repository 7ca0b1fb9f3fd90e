"""OpenAI's Images API in this service's terms: its JSON and form fields to the domain's `TaskRequest`, and our
replies, stream events and errors to its shapes.

Pure functions; `http_api` does the I/O. Validation stays in `service.validation`, shared with gRPC: this module
checks only what OpenAI's API itself defines (field types, `size` syntax, `response_format`, `partial_images`,
`background`) and renames the fields of validation's errors back to the names this client sent.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from model_store.interface import EDIT, IMG2IMG, INPAINT, TEXT2IMG

from .domain import Params, TaskRequest
from .errors import RETRY_DELAY_SECONDS, RETRYABLE, classify, cut
from .generation import SEED_MODULUS, Generation
from .registry import ModelRegistry, ServedModel

GENERATIONS, EDITS, MODELS = "/v1/images/generations", "/v1/images/edits", "/v1/models"
MAX_PARTIAL_IMAGES = 3  # OpenAI's range is 0-3

# Each field's type. Ours (the diffusion extensions) sit beside OpenAI's own; `strength` is for edits only.
_TEXT = ("prompt", "model", "size", "output_format", "response_format", "negative_prompt", "scheduler", "background")
_INTEGER = ("n", "output_compression", "partial_images", "num_inference_steps", "seed")
_NUMBER = ("guidance_scale", "true_cfg_scale", "strength")
# OpenAI fields with no meaning for a diffusion model: accepted, so that code written for OpenAI runs, and ignored.
IGNORED = ("user", "quality", "moderation", "style", "safety_identifier", "input_fidelity")
GENERATION_FIELDS = frozenset((*_TEXT, *_INTEGER, *_NUMBER, "stream", "loras", *IGNORED)) - {"strength"}
EDIT_FIELDS = GENERATION_FIELDS | {"strength", "image", "mask"}
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
# Validation's field names (the gRPC request's) -> this API's; anything else keeps its name.
_RENAMED = {
    "params.height": "size",
    "params.width": "size",
    "params.num_images": "n",
    "params.quality": "output_compression",
    "params.adapters": "loras",
    "params.steps": "num_inference_steps",
    "mask_image": "mask",
    "images": "image",
    "params": None,  # the pixel-steps budget: images x size x steps, no one field
}
_STATUS = {  # gRPC status -> HTTP status and OpenAI's error type
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (400, "invalid_request_error"),  # the model serves no such task
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error"),  # nobody reads it: the client has gone
}
_NOT_RETRYABLE_EXHAUSTION = {"REPLY_TOO_LARGE": ("n", 400), "OUT_OF_MEMORY": (None, 400)}  # the request is too big


class HttpError(Exception):
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with its HTTP status and the
    gRPC status name that the request's metrics and log line carry (one vocabulary for both doors)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_argument",
        kind: str = "invalid_request_error",
        grpc_code: str = "INVALID_ARGUMENT",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.grpc_code = grpc_code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_field(param: str | None, description: str) -> HttpError:
    """400 for one field (`param`), worded as validation words it: `invalid request: field: why`."""
    return HttpError(400, f"invalid request: {param}: {description}" if param else description, param)


def http_error(exc: BaseException) -> HttpError:
    """Any exception of the shared path (validation, queue, workers) as this API reports it."""
    if isinstance(exc, HttpError):
        return exc
    found = classify(exc)
    status, kind = _STATUS.get(found.code, (500, "server_error"))
    param = None
    if found.violations:
        renamed = [(http_field(v.field), v.description) for v in found.violations]
        param = renamed[0][0]
        message = "invalid request: " + "; ".join(f"{name}: {why}" if name else why for name, why in renamed)
    else:
        message = found.message
    if found.code == grpc.StatusCode.NOT_FOUND or found.reason == "TASK_NOT_SERVED":
        param = "model"
    if found.reason in _NOT_RETRYABLE_EXHAUSTION:
        param, status = _NOT_RETRYABLE_EXHAUSTION[found.reason]
        kind = "invalid_request_error"
    retry = RETRY_DELAY_SECONDS if found.reason in RETRYABLE else None
    return HttpError(status, cut(message, 1024), param, found.reason.lower(), kind, found.code.name, retry_after=retry)


def http_field(name: str) -> str | None:
    """A validation field name as this API calls it: `params.num_images` -> `n`, `params.adapters[1].weight` ->
    `loras[1].weight`, `images[0]` -> `image[0]`, `params.guidance_scale` -> `guidance_scale`."""
    if name in _RENAMED:
        return _RENAMED[name]
    base, bracket, rest = name.partition("[")
    renamed = _RENAMED.get(base)
    if bracket and renamed:
        return f"{renamed}[{rest}"
    return name.removeprefix("params.")


# --- requests ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagesCall:
    """One call of the Images API: the task request for the shared path, and how to answer it."""

    request: TaskRequest
    stream: bool = False
    partial_images: int = 0
    events: str = "image_generation"  # the stream events' prefix: image_generation, or image_edit for edits
    output_format: str = "png"


@dataclass
class Form:
    """A request's fields, typed: from a JSON body, or a multipart form (whose values are all text)."""

    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: Mapping[str, Any], allowed: frozenset[str], from_text: bool) -> Form:
        """Typed fields, or a 400 naming the first field that is unknown or of the wrong type. JSON null is a field
        not given."""
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in allowed:
                raise bad_field(cut(name, 64), "is not a field of this endpoint (unrecognized request argument)")
            if value is None or name in IGNORED:
                continue
            values[name] = _typed(name, value, from_text)
        return cls(values)

    def get(self, name: str) -> Any:
        return self.values.get(name)


def _typed(name: str, value: Any, from_text: bool) -> Any:
    if name == "loras":
        return _loras(json.loads(value) if from_text and isinstance(value, str) else value)
    if name == "stream":
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise bad_field(name, f"must be a boolean, got {_shown(value)}")
    if name in _INTEGER:
        number = _number(name, value, from_text)
        if number != int(number):
            raise bad_field(name, f"must be an integer, got {_shown(value)}")
        return int(number)
    if name in _NUMBER:
        return _number(name, value, from_text)
    if not isinstance(value, str):
        raise bad_field(name, f"must be a string, got {_shown(value)}")
    return value


def _number(name: str, value: Any, from_text: bool) -> float:
    if from_text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad_field(name, f"must be a number, got {_shown(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise bad_field(name, f"must be a finite number, got {_shown(value)}")
    return value


def _finite(value: float) -> bool:
    """Finite, and within a float's range: JSON integers have no bound, and 10**400 would overflow downstream."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _loras(value: Any) -> tuple[tuple[str, float], ...]:
    """`[{"name": ..., "weight": ...}]` (weight 1.0 when left out), as the gRPC request's adapters."""
    if not isinstance(value, list):
        raise bad_field("loras", 'must be a list of {"name": ..., "weight": ...}')
    pairs = []
    for index, entry in enumerate(value):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or set(entry) - {"name", "weight"}:
            raise bad_field(f"loras[{index}]", 'must be {"name": NAME, "weight": NUMBER}')
        weight = entry.get("weight", 1.0)
        if isinstance(weight, str):
            weight = _number(f"loras[{index}].weight", weight, True)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise bad_field(f"loras[{index}].weight", f"must be a number, got {_shown(weight)}")
        pairs.append((entry["name"], float(weight)))
    return tuple(pairs)


def form_loras(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The openai client's form encoding of `loras` (`loras[][name]`, `loras[][weight]`, in order) as a list."""
    entries: list[dict[str, str]] = []
    for key, value in pairs:
        part = key.removeprefix("loras[]").strip("[]")
        if part not in ("name", "weight"):
            raise bad_field("loras", f"unknown form field {_shown(key)}")
        if not entries or part in entries[-1]:
            entries.append({})
        entries[-1][part] = value
    return entries


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return cut(text, 64)


def _model(form: Form, registry: ModelRegistry) -> str:
    """The served tag asked for: optional while one model is served."""
    tag = form.get("model")
    if tag:
        return str(tag)
    if len(registry.models) > 1:
        served = ", ".join(m.tag for m in registry.models)
        raise bad_field("model", f"is required: this server serves several models ({served})")
    return registry.default.tag


def _size(form: Form) -> tuple[int | None, int | None]:
    size = form.get("size")
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise bad_field("size", f"must be WIDTHxHEIGHT (such as 1024x1024) or auto, got {_shown(size)}")
    width, height = (int(side) for side in match.groups())
    return height, width


def _params(form: Form) -> Params:
    """GenerationParams from the fields both endpoints take."""
    height, width = _size(form)
    n = form.get("n")
    if n is not None and n < 1:
        raise bad_field("n", f"must be at least 1, got {n}")
    seed = form.get("seed")
    if seed is not None and not 0 <= seed < SEED_MODULUS:
        raise bad_field("seed", f"must be in [0, 2**64), got {seed}")
    if form.get("response_format") not in (None, "b64_json"):
        given = _shown(form.get("response_format"))
        raise bad_field(
            "response_format", f"must be b64_json: this server returns images inline, not as URLs; got {given}"
        )
    if form.get("background") not in (None, "auto", "opaque"):
        raise bad_field(
            "background",
            f"must be auto or opaque: diffusion models make opaque images; got {_shown(form.get('background'))}",
        )
    compression = form.get("output_compression")
    if compression is not None and not 0 <= compression <= 100:
        raise bad_field("output_compression", f"must be between 0 and 100, got {compression}")
    return Params(
        steps=form.get("num_inference_steps"),
        guidance_scale=form.get("guidance_scale"),
        height=height,
        width=width,
        seed=seed,
        num_images=n or 1,
        scheduler=form.get("scheduler") or None,
        output_format=form.get("output_format") or "png",
        quality=max(1, compression) if compression is not None else None,  # JPEG/WebP quality 1-100
        adapters=form.get("loras") or (),
        true_cfg_scale=form.get("true_cfg_scale"),
    )


def _streaming(form: Form) -> tuple[bool, int]:
    stream = bool(form.get("stream"))
    partial = form.get("partial_images")
    if partial is not None and not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise bad_field("partial_images", f"must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial}")
    if partial and not stream:
        raise bad_field("partial_images", "needs stream: true")
    return stream, partial or 0


def generation_call(form: Form, registry: ModelRegistry) -> ImagesCall:
    """POST /v1/images/generations: a text-to-image request."""
    if not isinstance(form.get("prompt"), str):
        raise bad_field("prompt", "is required: describe the image to make")
    stream, partial = _streaming(form)
    params = _params(form)
    request = TaskRequest(
        task=TEXT2IMG,
        model=_model(form, registry),
        prompt=form.get("prompt"),
        negative_prompt=form.get("negative_prompt") or None,
        params=params,
    )
    return ImagesCall(request, stream, partial, "image_generation", params.output_format)


def edit_task(served: ServedModel, images: int, masked: bool) -> str:
    """Where an edit goes: with a mask, inpainting; without, the model's edit task where it serves one, else
    image-to-image."""
    if masked:
        if not served.serves(INPAINT):
            raise bad_field("mask", f"{served.tag} does not inpaint; send no mask to edit the whole image")
        task = INPAINT
    else:
        task = EDIT if served.serves(EDIT) else IMG2IMG
    if task != EDIT and images > 1:
        raise bad_field("image", f"{served.tag}'s {_TASK_NAMES[task]} takes one image, got {images}")
    return task


_TASK_NAMES = {INPAINT: "inpainting", IMG2IMG: "image-to-image", EDIT: "edit"}


def edit_call(form: Form, registry: ModelRegistry, images: Sequence[bytes], mask: bytes | None) -> ImagesCall:
    """POST /v1/images/edits: inpainting, edit or image-to-image (`edit_task`); `mask` already converted to the
    white-repaints mask diffusers takes."""
    if not isinstance(form.get("prompt"), str):
        raise bad_field("prompt", "is required: describe the change to make")
    if not images:
        raise bad_field("image", "is required: send the image to edit as a file")
    stream, partial = _streaming(form)
    params = _params(form)
    tag = _model(form, registry)
    served = registry.resolve(tag)
    task = edit_task(served, len(images), mask is not None)
    strength = form.get("strength")
    if strength is not None and task == EDIT:
        raise bad_field("strength", f"{served.tag} edits by instruction and takes no strength")
    request = TaskRequest(
        task=task,
        model=tag,
        prompt=form.get("prompt"),
        negative_prompt=form.get("negative_prompt") or None,
        params=params,
        image=images[0] if task != EDIT else None,
        mask_image=mask,
        strength=strength,
        images=tuple(images) if task == EDIT else (),
    )
    return ImagesCall(request, stream, partial, "image_edit", params.output_format)


# --- replies -------------------------------------------------------------------------------------------------


def usage(job: Generation, images: int, steps_cached: int) -> dict[str, Any]:
    """What a reply cost, in work, not tokens: `images`, and `denoising_steps` (each image's steps, the share
    that `strength` runs, times the images), of which `steps_cached` reused the feature cache. OpenAI's token
    fields are there for clients that read them: no text or image tokens go in, and the denoising steps are the
    output (`output_tokens` = `total_tokens` = `denoising_steps`)."""
    steps = job.denoising_steps() * images
    return {
        "images": images,
        "denoising_steps": steps,
        "steps_cached": steps_cached,
        "input_tokens": 0,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens": steps,
        "total_tokens": steps,
    }


def images_reply(job: Generation, response: Any, call: ImagesCall) -> dict[str, Any]:
    """The JSON reply: each image base64-encoded (the same bytes the gRPC reply carries), with its seed."""
    images = list(response.images)
    return {
        "created": _now(),
        "data": [{"b64_json": _b64(image.image.data), "seed": image.seed} for image in images],
        "background": "opaque",
        "output_format": call.output_format,
        "size": _size_of(images),
        "usage": usage(job, len(images), response.steps_cached),
    }


def completed_events(job: Generation, response: Any, call: ImagesCall) -> list[dict[str, Any]]:
    """The stream's last events: one `completed` per image, in order, each with the whole request's usage."""
    images = list(response.images)
    spent = usage(job, len(images), response.steps_cached)
    return [
        {
            "type": f"{call.events}.completed",
            "b64_json": _b64(image.image.data),
            "seed": image.seed,
            "background": "opaque",
            "created_at": _now(),
            "output_format": call.output_format,
            "quality": "auto",
            "size": f"{image.image.width}x{image.image.height}",
            "usage": spent,
        }
        for image in images
    ]


def partial_event(call: ImagesCall, index: int, data: bytes, width: int, height: int) -> dict[str, Any]:
    return {
        "type": f"{call.events}.partial_image",
        "b64_json": _b64(data),
        "partial_image_index": index,
        "background": "opaque",
        "created_at": _now(),
        "output_format": call.output_format,
        "quality": "auto",
        "size": f"{width}x{height}",
    }


def partial_steps(total: int, count: int) -> list[int]:
    """The denoising steps after which the partial images are taken: `count` of them, evenly spread before the
    last step (whose image is the completed one). Fewer when there are fewer steps, as OpenAI allows."""
    steps = sorted({round(k * total / (count + 1)) for k in range(1, count + 1)})
    return [step for step in steps if 1 <= step < total]


def sse(event: Mapping[str, Any]) -> bytes:
    """One server-sent event, named by its type (OpenAI's framing)."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def sse_error(error: HttpError) -> bytes:
    """An error after the stream began: the openai client raises it from the `error` key."""
    return f"event: error\ndata: {json.dumps(error.body())}\n\n".encode()


def models_reply(registry: ModelRegistry) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(served) for served in registry.models]}


def model_entry(served: ServedModel) -> dict[str, Any]:
    return {"id": served.tag, "object": "model", "created": _created(served), "owned_by": "diffusers-grpc"}


def _created(served: ServedModel) -> int:
    try:
        return int(datetime.datetime.fromisoformat(served.model.info.created).timestamp())
    except (TypeError, ValueError):
        return 0


def _size_of(images: Sequence[Any]) -> str | None:
    return f"{images[0].image.width}x{images[0].image.height}" if images else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _now() -> int:
    return int(datetime.datetime.now(datetime.UTC).timestamp())
