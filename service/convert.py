"""The edge: proto messages to domain requests, and domain results back to proto messages.

In the spirit of TGI's `from_pb`/`to_pb`: the servicer hands a request here and gets a domain object back, and
hands results here to get the reply; requests and replies are converted here and nowhere else. Encoding images
(tens of ms) happens in the `*_response` functions, which the servicer runs off the event loop.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from batching import CallOutput, ItemOutput, StepEvent
from model_store.interface import EDIT, IMG2IMG, INPAINT, TEXT2IMG

from . import imaging
from .domain import CallRequest, Params, SizeConditioning, TaskRequest
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generation import CallJob, Generation
from .registry import ServedModel

MAX_LISTED_VALUES = 65536  # larger arrays are summarised, not sent
NSFW_OUTPUT = "nsfw_content_detected"
_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: "png",
    pb.OUTPUT_FORMAT_PNG: "png",
    pb.OUTPUT_FORMAT_JPEG: "jpeg",
    pb.OUTPUT_FORMAT_WEBP: "webp",
}
_TASK_OF_REQUEST = {
    pb.TextToImageRequest: TEXT2IMG,
    pb.ImageToImageRequest: IMG2IMG,
    pb.InpaintRequest: INPAINT,
    pb.EditRequest: EDIT,
}
_RESPONSE_OF_TASK = {
    TEXT2IMG: pb.TextToImageResponse,
    IMG2IMG: pb.ImageToImageResponse,
    INPAINT: pb.InpaintResponse,
    EDIT: pb.EditResponse,
}
# StreamRequest's oneof field -> StreamResponse's oneof field of the result
STREAM_RESULT_FIELD = {
    "text_to_image": "text_to_image",
    "image_to_image": "image_to_image",
    "inpaint": "inpaint",
    "call": "call",
    "edit": "edit",
}

TypedRequest = pb.TextToImageRequest | pb.ImageToImageRequest | pb.InpaintRequest | pb.EditRequest
TypedResponse = pb.TextToImageResponse | pb.ImageToImageResponse | pb.InpaintResponse | pb.EditResponse

# --- requests ------------------------------------------------------------------------------------------------


def task_request(request: TypedRequest) -> TaskRequest:
    """A TextToImage, ImageToImage, Inpaint or Edit request in domain form."""
    task = _TASK_OF_REQUEST[type(request)]
    if isinstance(request, pb.EditRequest):
        return edit_request(request)
    image = mask = strength = None
    if isinstance(request, (pb.ImageToImageRequest, pb.InpaintRequest)):
        image = request.image.data
        strength = request.strength if request.HasField("strength") else None
    if isinstance(request, pb.InpaintRequest):
        mask = request.mask_image.data
    return TaskRequest(
        task=task,
        model=request.model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        params=params(request.params),
        image=image,
        mask_image=mask,
        strength=strength,
        prompt_2=request.prompt_2 or None,
        negative_prompt_2=request.negative_prompt_2 or None,
        control_images=tuple(control.data for control in request.control_images),
        prompt_3=request.prompt_3 or None,
        negative_prompt_3=request.negative_prompt_3 or None,
    )


def edit_request(request: pb.EditRequest) -> TaskRequest:
    """An Edit: its own output_format and quality, where set, take the place of its params'."""
    given = params(request.params)
    if request.output_format != pb.OUTPUT_FORMAT_UNSPECIFIED:
        given = dataclasses.replace(given, output_format=output_format(request.output_format))
    if request.quality:
        given = dataclasses.replace(given, quality=request.quality)
    return TaskRequest(
        task=EDIT,
        model=request.model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        params=given,
        images=tuple(image.data for image in request.images),
    )


def params(message: pb.GenerationParams) -> Params:
    fields: Any = message  # HasField's stub wants literal names

    def given(name: str) -> Any:
        return getattr(message, name) if fields.HasField(name) else None

    return Params(
        steps=given("num_inference_steps"),
        guidance_scale=given("guidance_scale"),
        height=given("height"),
        width=given("width"),
        seed=given("seed"),
        num_images=message.num_images or 1,
        scheduler=message.scheduler or None,
        eta=given("eta"),
        output_format=output_format(message.output_format),
        quality=given("quality"),
        size_conditioning=size_conditioning(message.size_conditioning),
        aesthetic_score=given("aesthetic_score"),
        negative_aesthetic_score=given("negative_aesthetic_score"),
        control_scales=tuple(message.control_scales),
        control_guidance_start=given("control_guidance_start"),
        control_guidance_end=given("control_guidance_end"),
        adapters=tuple((adapter.name, adapter.weight) for adapter in message.adapters),
        true_cfg_scale=given("true_cfg_scale"),
        max_sequence_length=given("max_sequence_length"),
        cache=(message.cache.method, message.cache.threshold) if fields.HasField("cache") else None,
    )


def size_conditioning(message: pb.SizeConditioning) -> SizeConditioning:
    fields: Any = message
    return SizeConditioning(
        **{f.name: getattr(message, f.name) if fields.HasField(f.name) else None for f in message.DESCRIPTOR.fields}
    )


def call_request(request: pb.CallRequest) -> CallRequest:
    return CallRequest(
        model=request.model,
        signature=request.signature,
        arguments=struct(request.arguments) if request.HasField("arguments") else {},
        images={name: image.data for name, image in request.images.items()},
        seed=request.seed if request.HasField("seed") else None,
        output_format=output_format(request.output_format),
        animated_webp=request.animated_webp,
    )


def struct(message: Any) -> dict[str, Any]:
    """A Struct as Python values, kept as sent (NaN and Infinity too: validation names them)."""
    return {key: struct_value(item) for key, item in message.fields.items()}


def struct_value(message: Any) -> Any:
    kind = message.WhichOneof("kind")
    if kind == "struct_value":
        return struct(message.struct_value)
    if kind == "list_value":
        return [struct_value(item) for item in message.list_value.values]
    return None if kind in (None, "null_value") else getattr(message, kind)


def output_format(value: int) -> str:
    return _FORMATS.get(value, f"#{value}")  # type: ignore[call-overload]


def stream_request(request: pb.StreamRequest) -> tuple[str | None, TaskRequest | CallRequest | None, int]:
    """(the oneof field set, its request in domain form, preview_every); (None, None, ...) when none is set."""
    kind = request.WhichOneof("request")
    if kind is None:
        return None, None, request.preview_every
    inner = getattr(request, kind)
    return kind, call_request(inner) if kind == "call" else task_request(inner), request.preview_every


# --- responses -----------------------------------------------------------------------------------------------


def task_response(job: Generation, outputs: Sequence[ItemOutput]) -> TypedResponse:
    """The typed response of a task: resolved tag, each image encoded with its seed, warnings."""
    images = [
        pb.GeneratedImage(
            image=image_message(output.image, job.mime_type, job.quality, job.describe(seed, output.image.size)),
            seed=seed,
            nsfw_content_detected=output.nsfw,
        )
        for seed, output in zip(job.seeds(), outputs)
    ]
    response = _RESPONSE_OF_TASK[job.task](
        model=job.served.tag,
        images=images,
        warnings=job.warnings,
        steps_computed=sum(output.steps_computed or 0 for output in outputs),
        steps_cached=sum(output.steps_cached or 0 for output in outputs),
    )
    return response  # type: ignore[return-value]


def call_response(job: CallJob, output: CallOutput) -> pb.CallResponse:
    """Images (PIL, alone or in lists) become GeneratedImages, and so do video frames, in order (with each video
    also as an animated WebP in `outputs["<name>_webp"]` when asked); everything else goes into the outputs Struct."""
    images: list[Image.Image] = []
    others: dict[str, Any] = {}
    for name, value in output.values.items():
        if name == NSFW_OUTPUT:
            continue
        videos = imaging.video_frames(name, value)
        if videos:
            images += [frame for frames in videos for frame in frames]
            if job.animated_webp:
                others[f"{name}_webp"] = [base64.b64encode(imaging.animated_webp(frames)).decode() for frames in videos]
        elif found := _images_in(value):
            images += found
        else:
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


def stream_result(kind: str, response: TypedResponse | pb.CallResponse) -> pb.StreamResponse:
    event = pb.StreamResponse()
    getattr(event, STREAM_RESULT_FIELD[kind]).CopyFrom(response)
    return event


def progress(event: StepEvent, preview_every: int) -> pb.StreamResponse:
    """A Progress event, with a small preview of the item's latents every `preview_every` steps and at the end."""
    message = pb.Progress(step=event.step, total_steps=event.total, elapsed_seconds=event.elapsed)
    if preview_every and (event.step % preview_every == 0 or event.step == event.total):
        preview = imaging.latent_preview(event.latents)
        if preview is not None:
            message.preview.CopyFrom(image_message(preview, imaging.PNG, None, {}))
    return pb.StreamResponse(progress=message)


def model_info(served: ServedModel) -> pb.ModelInfo:
    model = served.model
    main = served.main_signature()
    height, width = served.default_size(main)
    return pb.ModelInfo(
        tag=model.tag,
        signatures=[signature_info(served, s) for s in model.signatures.values()],
        pipeline_class=model.info.pipeline_class,
        schedulers=list(served.defaults.compatible_schedulers),
        default_height=height,
        default_width=width,
        labels=dict(model.info.labels),
        default_scheduler=served.defaults.scheduler,
        dtype=served.dtype,
        dtype_enum=_enum(pb.Dtype, "DTYPE", served.dtype),
        control_inputs=served.control_inputs,
        load_options=model.effective_options().shown(),
        adapters=served.adapters.names(),
        default_num_inference_steps=int(served.default(main, "num_inference_steps", 0)),
        default_guidance_scale=float(served.default(main, "guidance_scale", 0.0)),
    )


def signature_info(served: ServedModel, signature: Any) -> pb.SignatureInfo:
    """A signature with the defaults its own pipeline applies to what a request leaves unset."""
    height, width = served.default_size(signature.name) if signature.task != EDIT else (0, 0)
    return pb.SignatureInfo(
        name=signature.name,
        batchable=signature.batchable,
        batch_dim=signature.batch_dim,
        task=signature.task,
        task_enum=_enum(pb.Task, "TASK", signature.task),
        engine=served.engines[signature.name],
        engine_enum=_enum(pb.Engine, "ENGINE", served.engines[signature.name]),
        default_num_inference_steps=int(served.default(signature.name, "num_inference_steps", 0)),
        default_guidance_scale=float(served.default(signature.name, "guidance_scale", 0.0)),
        default_height=height,
        default_width=width,
    )


def _enum(enum: Any, prefix: str, value: str) -> Any:
    """The closed-set value beside a reported string ("text2img" -> TASK_TEXT2IMG); UNSPECIFIED for one the
    enum does not list yet."""
    name = f"{prefix}_{value.upper()}"
    found = enum.DESCRIPTOR.values_by_name.get(name)
    return int(found.number) if found is not None else 0


def image_message(image: Image.Image, mime_type: str, quality: int | None, text: Mapping[str, str]) -> pb.Image:
    encoded = imaging.encode(image, mime_type, quality=quality, text=text)
    return pb.Image(data=encoded.data, mime_type=encoded.mime_type, width=encoded.width, height=encoded.height)


def _images_in(value: Any) -> list[Image.Image]:
    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Image.Image) for v in value):
        return list(value)
    return []


def jsonable(value: Any) -> Any:
    """A Struct-compatible form of an output value: arrays as nested lists (large ones summarised by shape), other
    objects by their type; never the `str()` of an object."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "tolist"):
        dims = [int(side) for side in shape]
        if math.prod(dims) <= MAX_LISTED_VALUES:
            data = value.detach().cpu() if hasattr(value, "detach") else value
            return data.tolist()
        return {"shape": dims, "dtype": str(getattr(value, "dtype", "")), "omitted": "larger than the listing limit"}
    return {"type": type(value).__name__}
