"""The DiffusionService servicer. Each method validates, submits work items, awaits them, and converts back.

No model code runs on the event loop: pipelines run on executor workers, encoding on a thread pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from batching import Executor
from batching.diffusers_runner import ItemOutput

from . import imaging
from .errors import Unavailable, Unimplemented, status_for
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc
from .generation import Generation
from .registry import ModelRegistry, ServedModel
from .validation import Limits, text_to_image

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def rpc(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turn any exception a handler raises into its gRPC status, in one place."""

    @functools.wraps(method)
    async def wrapper(self: DiffusionServicer, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            if not self.accepting:
                raise Unavailable("the server is not ready or is shutting down")
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            status = status_for(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)
            raise  # unreachable: abort raises

    return wrapper


class DiffusionServicer(pb_grpc.DiffusionServiceServicer):
    def __init__(self, registry: ModelRegistry, executor: Executor, limits: Limits, encode_threads: int = 2) -> None:
        self.registry = registry
        self.executor = executor
        self.limits = limits
        self.accepting = False  # set by the server once the models are warm
        self._encoder = ThreadPoolExecutor(encode_threads, thread_name_prefix="encode")

    def close(self) -> None:
        self._encoder.shutdown(wait=False)

    @rpc
    async def TextToImage(
        self, request: pb.TextToImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.TextToImageResponse:
        generation = text_to_image(request, self.registry, self.limits)
        images = await self._generate(generation, context)
        return pb.TextToImageResponse(model=generation.served.tag, images=images, warnings=generation.warnings)

    # Declared in the proto; served by the Full API issue. Until then they answer UNIMPLEMENTED, as gRPC would.
    @rpc
    async def ImageToImage(self, request: pb.ImageToImageRequest, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ImageToImage is not served by this version")

    @rpc
    async def Inpaint(self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("Inpaint is not served by this version")

    @rpc
    async def Call(self, request: pb.CallRequest, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("Call is not served by this version")

    async def Stream(self, request: pb.StreamRequest, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        status = status_for(Unimplemented("Stream is not served by this version"))
        await context.abort(status.code, status.details, status.trailing_metadata)

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(served) for served in self.registry.models])

    @rpc
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_info(self.registry.resolve(request.model)))

    async def _generate(self, generation: Generation, context: grpc.aio.ServicerContext) -> list[pb.GeneratedImage]:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        items = generation.work_items(deadline)
        self.executor.submit(items)
        try:
            outputs = await asyncio.gather(*(asyncio.wrap_future(item.future) for item in items))
        finally:
            for item in items:  # the client went away or a sibling failed: drop what has not run
                if not item.future.done():
                    item.cancel()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encoder, encode_outputs, generation, outputs)


def encode_outputs(generation: Generation, outputs: Sequence[ItemOutput]) -> list[pb.GeneratedImage]:
    images = []
    for seed, output in zip(generation.seeds(), outputs):
        encoded = imaging.encode(
            output.image, generation.mime_type, quality=generation.quality, text=generation.describe(seed)
        )
        images.append(
            pb.GeneratedImage(
                image=pb.Image(
                    data=encoded.data, mime_type=encoded.mime_type, width=encoded.width, height=encoded.height
                ),
                seed=seed,
                nsfw_content_detected=output.nsfw,
            )
        )
    return images


def model_info(served: ServedModel) -> pb.ModelInfo:
    model = served.model
    return pb.ModelInfo(
        tag=model.tag,
        signatures=[
            pb.SignatureInfo(name=s.name, batchable=s.batchable, batch_dim=s.batch_dim, task=s.task)
            for s in model.signatures.values()
        ],
        pipeline_class=model.info.pipeline_class,
        schedulers=list(served.defaults.compatible_schedulers),
        default_height=served.defaults.height,
        default_width=served.defaults.width,
        labels=dict(model.info.labels),
        default_scheduler=served.defaults.scheduler,
    )
