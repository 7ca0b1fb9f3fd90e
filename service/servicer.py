"""The DiffusionService servicer. Each method converts (`convert`), validates, submits work items, awaits them,
and converts back; `rpc` turns whatever it raises into a status, for unary and streaming methods alike.

No model code runs on the event loop: pipelines run on executor workers; validation (which decodes input images)
and output encoding run on a small thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeAlias, TypeVar

import grpc

from batching import Executor, ItemOutput, ProgressCallback, StepEvent, WorkItem

from . import call_validation, convert, scope, validation
from .domain import CallRequest, TaskRequest
from .errors import FieldViolation, InvalidArgument, Unavailable, status_for
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc
from .generation import Generation
from .registry import ModelRegistry, ServedModel
from .security import peer_address
from .tracing import RequestSpans
from .validation import Limits

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
Result = TypeVar("Result")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Method = TypeVar("Method", bound=Callable[..., Any])


def rpc(method: Method) -> Method:
    """Turn any exception a handler raises into its gRPC status, in one place, for unary and streaming handlers.

    A handler runs only while the server accepts calls (UNAVAILABLE before readiness and while draining).
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self: DiffusionServicer, request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                with self.admit():
                    async for event in method(self, request, context):
                        yield event
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await abort(context, exc)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: DiffusionServicer, request: Any, context: Context) -> Any:
        try:
            with self.admit():
                return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    return unary  # type: ignore[return-value]


async def abort(context: Context, exc: BaseException) -> None:
    status = status_for(exc)
    request = scope.get()
    trailing = tuple(status.trailing_metadata)
    if request is not None:  # abort replaces trailing metadata: keep the request id the interceptor echoes
        trailing += ((REQUEST_ID_HEADER, request.request_id),)
    try:
        await context.abort(status.code, status.details, trailing)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        if not _ended(context):
            raise
        # The call ended before its status could be sent (its deadline passed, or the client left): the client has
        # its answer, and the request log and metrics must say the same; grpc would log this race as an ERROR.
        ended = grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
        context.set_code(ended)
        raise asyncio.CancelledError("the call ended before its status was sent") from exc


def _deadline_passed(context: Context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _ended(context: Context) -> bool:
    return context.cancelled() or _deadline_passed(context)


class _Admitted:
    """A call the server accepted whose work is not queued yet (it is being validated)."""

    def __init__(self, servicer: DiffusionServicer) -> None:
        self._servicer: DiffusionServicer | None = servicer
        servicer.admitting += 1

    def settle(self) -> None:
        """Its work is queued, or the call ended without any: a drain need no longer wait for it."""
        if self._servicer is not None:
            self._servicer.admitting -= 1
            self._servicer = None


_admitted: ContextVar[_Admitted | None] = ContextVar("admitted", default=None)


class DiffusionServicer(pb_grpc.DiffusionServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        limits: Limits,
        encode_threads: int = 2,
        client_id_header: str | None = None,
        on_results: Callable[[str, int, Sequence[ItemOutput]], None] | None = None,
        spans: RequestSpans | None = None,
    ) -> None:
        self.registry = registry
        self.spans = spans or RequestSpans(None)  # our spans under each RPC's, when tracing is on
        self.on_results = on_results  # each typed task's outputs, with its model's tag and steps (metrics)
        self.executor = executor
        self.limits = limits
        self.client_id_header = client_id_header
        self.accepting = False  # set by the server once the models are warm
        self.admitting = 0  # accepted calls whose work is not queued yet: a drain lets them queue it first
        self._encoder = ThreadPoolExecutor(encode_threads, thread_name_prefix="codec")

    def close(self) -> None:
        self._encoder.shutdown(wait=False)

    def check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("the server is not ready or is shutting down")

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Accept a call, and count it in `admitting` until its work is queued or it ends.

        Without the count, a drain beginning while an accepted call is still validating would close the queue
        under it, and the call would fail with UNAVAILABLE although the server had taken it. The event loop
        runs this, so the check and the count happen together.
        """
        self.check_accepting()
        admitted = _Admitted(self)
        _admitted.set(admitted)  # each call runs in its own task (and context); Stream's inner task copies it
        try:
            yield
        finally:
            admitted.settle()

    # --- unary -----------------------------------------------------------------------------------------------

    @rpc
    async def TextToImage(self, request: pb.TextToImageRequest, context: Context) -> pb.TextToImageResponse:
        return await self._task(convert.task_request(request), context, None)  # type: ignore[return-value]

    @rpc
    async def ImageToImage(self, request: pb.ImageToImageRequest, context: Context) -> pb.ImageToImageResponse:
        return await self._task(convert.task_request(request), context, None)  # type: ignore[return-value]

    @rpc
    async def Inpaint(self, request: pb.InpaintRequest, context: Context) -> pb.InpaintResponse:
        return await self._task(convert.task_request(request), context, None)  # type: ignore[return-value]

    @rpc
    async def Edit(self, request: pb.EditRequest, context: Context) -> pb.EditResponse:
        return await self._task(convert.task_request(request), context, None)  # type: ignore[return-value]

    @rpc
    async def Call(self, request: pb.CallRequest, context: Context) -> pb.CallResponse:
        return await self._call(convert.call_request(request), context, None)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(served) for served in self.registry.models])

    @rpc
    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model_info(self.resolve(request.model)))

    # --- streaming -------------------------------------------------------------------------------------------

    @rpc
    async def Stream(self, request: pb.StreamRequest, context: Context) -> AsyncIterator[pb.StreamResponse]:
        """Progress events from the worker (first image of the request), then the result."""
        kind, inner, preview_every = convert.stream_request(request)
        if kind is None or inner is None:
            raise InvalidArgument.of(
                [FieldViolation("request", "set one of text_to_image, image_to_image, inpaint, edit, call")]
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.StreamResponse] = asyncio.Queue()
        on_progress = _progress_sender(loop, events, preview_every)
        if isinstance(inner, CallRequest):
            work: Any = self._call(inner, context, on_progress)
        else:
            work = self._task(inner, context, on_progress)
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        getter: asyncio.Future[pb.StreamResponse] | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
            while not events.empty():  # progress sent before the result was set, still queued
                yield events.get_nowait()
            yield convert.stream_result(kind, task.result())
        finally:  # the client may have gone: stop the work and the pending read
            task.cancel()
            if getter is not None:
                getter.cancel()

    # --- the common path -------------------------------------------------------------------------------------

    async def _task(
        self, request: TaskRequest, context: Context, on_progress: ProgressCallback | None
    ) -> convert.TypedResponse:
        job, results = await self.generate(request, _deadline(context), self._client(context), on_progress)
        return await self.encode(job, results)

    async def generate(
        self, request: TaskRequest, deadline: float | None, client: str, on_progress: ProgressCallback | None
    ) -> tuple[Generation, list[ItemOutput]]:
        """Validate a typed task, queue its images and await them: the one path of both doors (gRPC and the
        OpenAI-compatible HTTP API), so both validate, queue, count and trace a request alike."""
        self.resolve(request.model)
        with self.spans.span("validate"):
            job = await self.off_loop(validation.generation, request, self.registry, self.limits)
        items = job.work_items(deadline, on_progress, client)
        results = await self._traced_run(items, job.served.engines.get(job.signature.name, "request"))
        if self.on_results is not None:
            self.on_results(job.served.tag, job.denoising_steps(), results)
        return job, results

    async def encode(self, job: Generation, results: Sequence[ItemOutput]) -> convert.TypedResponse:
        """The task's reply, its images encoded off the event loop."""
        with self.spans.span("encode", images=len(results)):
            return await self.off_loop(convert.task_response, job, results)

    async def _call(self, request: CallRequest, context: Context, on_progress: ProgressCallback | None) -> Any:
        self.resolve(request.model)
        with self.spans.span("validate"):
            job = await self.off_loop(call_validation.call_job, request, self.registry, self.limits)
        (result,) = await self._traced_run(job.work_items(_deadline(context), on_progress, self._client(context)))
        with self.spans.span("encode"):
            return await self.off_loop(convert.call_response, job, result)

    async def _traced_run(self, items: Sequence[WorkItem], engine: str = "request") -> list[Any]:
        """Run the items; when tracing is on, their queue waits and denoising become spans, whatever the end."""
        self.spans.watch(items)
        try:
            return await self._submit_and_wait(items)
        finally:
            self.spans.record(items, engine, self.executor.now())

    def _client(self, context: Context) -> str:
        identity = (context.auth_context() or {}).get("x509_common_name")
        common_name = identity[0].decode(errors="replace") if identity else None
        return self.client_of(dict(context.invocation_metadata() or ()), common_name, peer_address(context))

    def client_of(self, headers: Mapping[str, Any], common_name: str | None, peer: str) -> str:
        """Who asks, for the queue's per-client share: the operator's header when it names one (cut, as any client
        value), else the mTLS identity, else the peer address without its port. Never logged, never a label."""
        if self.client_id_header:
            given = headers.get(self.client_id_header)
            if given:
                return f"header:{str(given)[:128]}"
        if common_name:
            return f"tls:{common_name[:128]}"
        return f"peer:{peer}"

    def resolve(self, tag: str) -> ServedModel:
        """The served model a request names; from now on its tag labels the request's metrics and log line."""
        served = self.registry.resolve(tag)
        request = scope.get()
        if request is not None:
            request.model = served.tag
        return served

    async def _submit_and_wait(self, items: Sequence[WorkItem]) -> list[Any]:
        request = scope.get()
        if request is not None:
            request.items.extend(items)
        try:
            self.executor.submit(items)
        finally:
            admitted = _admitted.get()
            if admitted is not None:
                admitted.settle()
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(item.future) for item in items)))
        finally:
            for item in items:  # the client went away or a sibling failed: drop what has not run
                if not item.future.done():
                    item.cancel()

    async def off_loop(self, work: Callable[..., Result], *args: Any) -> Result:
        """Decoding and encoding images can take tens of ms: keep them off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encoder, work, *args)


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


def _progress_sender(
    loop: asyncio.AbstractEventLoop, events: asyncio.Queue[pb.StreamResponse], preview_every: int
) -> ProgressCallback:
    """A progress callback for the worker thread: builds the event (and preview) there, hands it to the loop."""

    def send(event: StepEvent) -> None:
        loop.call_soon_threadsafe(events.put_nowait, convert.progress(event, preview_every))

    return send
