"""The DiffusionService servicer. Each method validates, submits work items, awaits them, and converts back.

No model code runs on the event loop: pipelines run on executor workers; validation (which decodes input images)
and output encoding run on a small thread pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias, TypeVar

import grpc

from batching import Executor, StepEvent, WorkItem
from batching.items import ProgressCallback

from . import outputs, scope, validation
from .errors import FieldViolation, InvalidArgument, Unavailable, status_for
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc
from .generation import Generation
from .registry import ModelRegistry, ServedModel
from .validation import Limits

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def rpc(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turn any exception a unary handler raises into its gRPC status, in one place."""

    @functools.wraps(method)
    async def wrapper(self: DiffusionServicer, request: Request, context: Context) -> Response:
        try:
            self.check_accepting()
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    return wrapper


async def abort(context: Context, exc: BaseException) -> None:
    status = status_for(exc)
    request = scope.get()
    trailing = tuple(status.trailing_metadata)
    if request is not None:  # abort replaces trailing metadata: keep the request id the interceptor echoes
        trailing += ((REQUEST_ID_HEADER, request.request_id),)
    await context.abort(status.code, status.details, trailing)


class DiffusionServicer(pb_grpc.DiffusionServiceServicer):
    def __init__(self, registry: ModelRegistry, executor: Executor, limits: Limits, encode_threads: int = 2) -> None:
        self.registry = registry
        self.executor = executor
        self.limits = limits
        self.accepting = False  # set by the server once the models are warm
        self._encoder = ThreadPoolExecutor(encode_threads, thread_name_prefix="codec")

    def close(self) -> None:
        self._encoder.shutdown(wait=False)

    def check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("the server is not ready or is shutting down")

    # --- typed tasks -----------------------------------------------------------------------------------------

    @rpc
    async def TextToImage(self, request: pb.TextToImageRequest, context: Context) -> pb.TextToImageResponse:
        return await self._text_to_image(request, context, None)

    @rpc
    async def ImageToImage(self, request: pb.ImageToImageRequest, context: Context) -> pb.ImageToImageResponse:
        return await self._image_to_image(request, context, None)

    @rpc
    async def Inpaint(self, request: pb.InpaintRequest, context: Context) -> pb.InpaintResponse:
        return await self._inpaint(request, context, None)

    @rpc
    async def Call(self, request: pb.CallRequest, context: Context) -> pb.CallResponse:
        return await self._call(request, context, None)

    async def _text_to_image(
        self, request: pb.TextToImageRequest, context: Context, on_progress: ProgressCallback | None
    ) -> pb.TextToImageResponse:
        job = await self._off_loop(validation.text_to_image, request, self.registry, self.limits)
        return pb.TextToImageResponse(**await self._task_reply(job, context, on_progress))

    async def _image_to_image(
        self, request: pb.ImageToImageRequest, context: Context, on_progress: ProgressCallback | None
    ) -> pb.ImageToImageResponse:
        job = await self._off_loop(validation.image_to_image, request, self.registry, self.limits)
        return pb.ImageToImageResponse(**await self._task_reply(job, context, on_progress))

    async def _inpaint(
        self, request: pb.InpaintRequest, context: Context, on_progress: ProgressCallback | None
    ) -> pb.InpaintResponse:
        job = await self._off_loop(validation.inpaint, request, self.registry, self.limits)
        return pb.InpaintResponse(**await self._task_reply(job, context, on_progress))

    async def _task_reply(
        self, job: Generation, context: Context, on_progress: ProgressCallback | None
    ) -> dict[str, Any]:
        """The fields the three typed responses share: resolved tag, images, warnings."""
        results = await self._submit_and_wait(job.work_items(_deadline(context), on_progress))
        images = await self._off_loop(outputs.generated_images, job, results)
        return {"model": job.served.tag, "images": images, "warnings": job.warnings}

    async def _call(
        self, request: pb.CallRequest, context: Context, on_progress: ProgressCallback | None
    ) -> pb.CallResponse:
        job = await self._off_loop(validation.call, request, self.registry, self.limits)
        (result,) = await self._submit_and_wait(job.work_items(_deadline(context), on_progress))
        return await self._off_loop(outputs.call_response, job, result)

    async def _submit_and_wait(self, items: Sequence[WorkItem]) -> list[Any]:
        request = scope.get()
        if request is not None:
            request.model = items[0].key.model if items else request.model
            request.items.extend(items)
        self.executor.submit(items)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(item.future) for item in items)))
        finally:
            for item in items:  # the client went away or a sibling failed: drop what has not run
                if not item.future.done():
                    item.cancel()

    async def _off_loop(self, work: Callable[..., Response], *args: Any) -> Response:
        """Decoding and encoding images can take tens of ms: keep them off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encoder, work, *args)

    # --- streaming -------------------------------------------------------------------------------------------

    async def Stream(self, request: pb.StreamRequest, context: Context) -> AsyncIterator[pb.StreamResponse]:
        """Progress events from the worker (first image of the request), then the result."""
        try:
            self.check_accepting()
            kind = request.WhichOneof("request")
            if kind is None:
                raise InvalidArgument.of(
                    [FieldViolation("request", "set one of text_to_image, image_to_image, inpaint, call")]
                )
            handlers: dict[str, Callable[..., Awaitable[Any]]] = {
                "text_to_image": self._text_to_image,
                "image_to_image": self._image_to_image,
                "inpaint": self._inpaint,
                "call": self._call,
            }
            handler = handlers[kind]
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[pb.StreamResponse] = asyncio.Queue()
            on_progress = _progress_sender(loop, events, request.preview_every)
            task: asyncio.Task[Any] = asyncio.ensure_future(handler(getattr(request, kind), context, on_progress))
            getter: asyncio.Future[pb.StreamResponse] | None = None
            try:
                while not task.done():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                while not events.empty():  # progress sent before the result was set, still queued
                    yield events.get_nowait()
                yield pb.StreamResponse(**{kind: task.result()})
            finally:  # the client may have gone: stop the work and the pending read
                task.cancel()
                if getter is not None:
                    getter.cancel()
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)

    # --- discovery -------------------------------------------------------------------------------------------

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(served) for served in self.registry.models])

    @rpc
    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_info(self.registry.resolve(request.model)))


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


def _progress_sender(
    loop: asyncio.AbstractEventLoop, events: asyncio.Queue[pb.StreamResponse], preview_every: int
) -> ProgressCallback:
    """A progress callback for the worker thread: builds the event (and preview) there, hands it to the loop."""

    def send(event: StepEvent) -> None:
        progress = pb.Progress(step=event.step, total_steps=event.total, elapsed_seconds=event.elapsed)
        if preview_every and (event.step % preview_every == 0 or event.step == event.total):
            preview = outputs.latent_preview(event.latents)
            if preview is not None:
                progress.preview.CopyFrom(preview)
        loop.call_soon_threadsafe(events.put_nowait, pb.StreamResponse(progress=progress))

    return send


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
