"""A small Python client for DiffusionService, over a channel configured like the server (64 MiB messages).

with DiffusionClient("localhost:50051") as client:
    reply = client.text_to_image("a fox", seed=7, steps=20)
    open("fox.png", "wb").write(reply.images[0].image.data)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_MB = 64
READINESS = "diffusion.v1.DiffusionService"  # the health service name that is SERVING once models are warm
FORMATS = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "jpg": pb.OUTPUT_FORMAT_JPEG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
}


# request type -> (its unary method, its field in StreamRequest)
_RPCS: dict[type, tuple[str, str]] = {
    pb.TextToImageRequest: ("TextToImage", "text_to_image"),
    pb.ImageToImageRequest: ("ImageToImage", "image_to_image"),
    pb.InpaintRequest: ("Inpaint", "inpaint"),
    pb.CallRequest: ("Call", "call"),
    pb.EditRequest: ("Edit", "edit"),
}


def params(
    *,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    scheduler: str = "",
    eta: float | None = None,
    output_format: str | int = "png",
    quality: int | None = None,
    size_conditioning: Mapping[str, int] | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    control_scales: Sequence[float] = (),
    control_guidance_start: float | None = None,
    control_guidance_end: float | None = None,
    adapters: Mapping[str, float] | None = None,
    true_cfg_scale: float | None = None,
    max_sequence_length: int | None = None,
    cache: str | None = None,
) -> pb.GenerationParams:
    """GenerationParams with only the given fields set (absent ones mean the model's default). `size_conditioning`
    takes SizeConditioning's field names: original_height, original_width, crop_top, crop_left, target_*;
    `adapters` maps LoRA names (ModelInfo.adapters) to their weights; `cache` is "first_block:THRESHOLD" or
    "none"."""
    fmt = FORMATS[output_format.lower()] if isinstance(output_format, str) else output_format
    message = pb.GenerationParams(
        num_images=num_images,
        scheduler=scheduler,
        output_format=fmt,  # type: ignore[arg-type]
        size_conditioning=pb.SizeConditioning(**(size_conditioning or {})),
        control_scales=list(control_scales),
        adapters=[pb.Adapter(name=name, weight=weight) for name, weight in (adapters or {}).items()],
    )
    optional = {
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "width": width,
        "height": height,
        "eta": eta,
        "quality": quality,
        "aesthetic_score": aesthetic_score,
        "negative_aesthetic_score": negative_aesthetic_score,
        "control_guidance_start": control_guidance_start,
        "control_guidance_end": control_guidance_end,
        "true_cfg_scale": true_cfg_scale,
        "max_sequence_length": max_sequence_length,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(message, name, value)
    if cache is not None:
        method, _, threshold = cache.partition(":")
        message.cache.CopyFrom(pb.Cache(method=method, threshold=float(threshold or 0)))
    return message


AnyRequest = pb.TextToImageRequest | pb.ImageToImageRequest | pb.InpaintRequest | pb.EditRequest | pb.CallRequest
TypedRequest = TypeVar("TypedRequest", pb.TextToImageRequest, pb.ImageToImageRequest, pb.InpaintRequest)


def typed_request(request: TypedRequest, kw: dict[str, Any]) -> TypedRequest:
    """Set the request-level fields SDXL, SD3 and ControlNet models take (`prompt_2`, `negative_prompt_2`,
    `prompt_3`, `negative_prompt_3`, `control_images` as encoded bytes, one per ControlNet) from `kw`, and the
    params from the rest."""
    for name in ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"):
        setattr(request, name, kw.pop(name, "") or "")
    request.control_images.extend(image(data) for data in kw.pop("control_images", ()))
    request.params.CopyFrom(params(**kw))
    return request


def wait_until_serving(target: str, timeout: float = 120.0, alive: Callable[[], bool] | None = None) -> None:
    """Poll the readiness service until SERVING (as a probe would), at most `timeout` seconds; raise
    TimeoutError then, or RuntimeError at once when `alive()` says the server process has gone."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"the server at {target} exited before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout}s")


def image(data: bytes, mime_type: str = "") -> pb.Image:
    """An input image from encoded bytes (PNG, JPEG or WebP; the server sniffs the type when not given)."""
    return pb.Image(data=data, mime_type=mime_type)


class DiffusionClient:
    """Blocking client. Use as a context manager, or call `close()`. Keyword arguments of the task methods are
    those of `params()`; `metadata` and `timeout` go to every call."""

    def __init__(
        self,
        target: str,
        *,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.DiffusionServiceStub(self.channel)
        self.metadata = list((metadata or {}).items())

    def __enter__(self) -> DiffusionClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def text_to_image(
        self, prompt: str, *, model: str = "", negative_prompt: str = "", timeout: float | None = None, **kw: Any
    ) -> pb.TextToImageResponse:
        request = typed_request(pb.TextToImageRequest(model=model, prompt=prompt, negative_prompt=negative_prompt), kw)
        return self.stub.TextToImage(request, timeout=timeout, metadata=self.metadata)

    def image_to_image(
        self,
        prompt: str,
        init_image: bytes,
        *,
        model: str = "",
        negative_prompt: str = "",
        strength: float | None = None,
        timeout: float | None = None,
        **kw: Any,
    ) -> pb.ImageToImageResponse:
        return self.stub.ImageToImage(
            self.image_to_image_request(
                prompt, init_image, model=model, negative_prompt=negative_prompt, strength=strength, **kw
            ),
            timeout=timeout,
            metadata=self.metadata,
        )

    def inpaint(
        self,
        prompt: str,
        init_image: bytes,
        mask: bytes,
        *,
        model: str = "",
        negative_prompt: str = "",
        strength: float | None = None,
        timeout: float | None = None,
        **kw: Any,
    ) -> pb.InpaintResponse:
        return self.stub.Inpaint(
            self.inpaint_request(
                prompt, init_image, mask, model=model, negative_prompt=negative_prompt, strength=strength, **kw
            ),
            timeout=timeout,
            metadata=self.metadata,
        )

    def edit(
        self,
        prompt: str,
        images: Sequence[bytes],
        *,
        model: str = "",
        negative_prompt: str = "",
        timeout: float | None = None,
        **kw: Any,
    ) -> pb.EditResponse:
        """Instruction editing of reference images (encoded bytes, in order)."""
        return self.stub.Edit(self.edit_request(prompt, images, model=model, negative_prompt=negative_prompt, **kw),
                              timeout=timeout, metadata=self.metadata)  # fmt: skip

    @staticmethod
    def edit_request(
        prompt: str, images: Sequence[bytes], *, model: str = "", negative_prompt: str = "", **kw: Any
    ) -> pb.EditRequest:
        request = pb.EditRequest(model=model, prompt=prompt, negative_prompt=negative_prompt)
        request.images.extend(image(data) for data in images)
        request.params.CopyFrom(params(**kw))
        return request

    def call(
        self,
        signature: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        images: Mapping[str, bytes] | None = None,
        model: str = "",
        seed: int | None = None,
        output_format: str = "png",
        timeout: float | None = None,
    ) -> pb.CallResponse:
        struct = struct_pb2.Struct()
        struct.update(dict(arguments or {}))
        request = pb.CallRequest(
            model=model,
            signature=signature,
            arguments=struct,
            images={name: image(data) for name, data in (images or {}).items()},
            output_format=FORMATS[output_format],  # type: ignore[arg-type]
        )
        if seed is not None:
            request.seed = seed
        return self.stub.Call(request, timeout=timeout, metadata=self.metadata)

    def stream(
        self,
        request: AnyRequest,
        *,
        preview_every: int = 0,
        timeout: float | None = None,
    ) -> Iterator[pb.StreamResponse]:
        """Progress events, then the result, for any of the five request kinds."""
        field = _RPCS[type(request)][1]
        wrapped = pb.StreamRequest(preview_every=preview_every)
        getattr(wrapped, field).CopyFrom(request)
        return self.stub.Stream(wrapped, timeout=timeout, metadata=self.metadata)  # type: ignore[no-any-return]

    def send(
        self,
        request: AnyRequest,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send a prepared request to its unary RPC (the response type follows the request type)."""
        return getattr(self.stub, _RPCS[type(request)][0])(request, timeout=timeout, metadata=self.metadata)

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata)

    def get_model(self, model: str = "", timeout: float | None = None) -> pb.GetModelResponse:
        return self.stub.GetModel(pb.GetModelRequest(model=model), timeout=timeout, metadata=self.metadata)

    @staticmethod
    def image_to_image_request(
        prompt: str,
        init_image: bytes,
        *,
        model: str = "",
        negative_prompt: str = "",
        strength: float | None = None,
        **kw: Any,
    ) -> pb.ImageToImageRequest:
        request = typed_request(
            pb.ImageToImageRequest(
                model=model, prompt=prompt, negative_prompt=negative_prompt, image=image(init_image)
            ),
            kw,
        )
        if strength is not None:
            request.strength = strength
        return request

    @staticmethod
    def inpaint_request(
        prompt: str,
        init_image: bytes,
        mask: bytes,
        *,
        model: str = "",
        negative_prompt: str = "",
        strength: float | None = None,
        **kw: Any,
    ) -> pb.InpaintRequest:
        request = typed_request(
            pb.InpaintRequest(
                model=model,
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=image(init_image),
                mask_image=image(mask),
            ),
            kw,
        )
        if strength is not None:
            request.strength = strength
        return request
