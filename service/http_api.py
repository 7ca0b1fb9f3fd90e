"""The OpenAI-compatible Images API over HTTP, beside gRPC: the same process, event loop, servicer path
(`DiffusionServicer.generate`: validation, limits, queue, executor), bearer token, TLS files, metrics, request log,
request ids and drain. Only the shapes differ (`service.openai_api`).

Why aiohttp: it is asyncio's own HTTP server, so it runs on the loop grpc.aio already runs (no second loop, no
thread); it is well kept (releases every few weeks, the asyncio HTTP stack most projects use) and was already
installed (s3fs needs it); and it brings what this API needs without more dependencies: streamed responses for
server-sent events, multipart parsing, TLS from an `ssl` context, a body limit, and `handler_cancellation`, which
cancels a handler whose client disconnected: that is how a dropped call frees its place in the queue.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy
from PIL import Image

from batching import StepEvent

from . import imaging, openai_api, scope
from .config import ConfigError, ServerConfig
from .errors import Unauthenticated, Unavailable, cut
from .openai_api import EDITS, GENERATIONS, MODELS, Form, HttpError, ImagesCall, bad_field, http_error
from .security import (
    UNAUTHENTICATED_MESSAGE,
    FailedAuthLimiter,
    limited_error,
    ssl_context,
    token_matches,
)
from .servicer import REQUEST_ID_HEADER, DiffusionServicer
from .telemetry import TelemetryInterceptor, request_id
from .validation import MIME_TYPES

SHUTDOWN_SECONDS = 1.0  # the drain has already waited for every request in flight: this is only for idle sockets
LATENT_SCALE = 8  # a latent preview's pixels per side: it is made only for SD-family latents, whose VAE is 8x


@dataclass
class _Outcome:
    """How a request ended, for its metrics and log line: a gRPC status name, and the HTTP status sent."""

    code: str = "OK"
    status: int = 200
    prompt: str = ""


class HttpApi:
    """`start` binds and serves; `stop_accepting` closes the listener (a drain's GOAWAY); `close` ends it."""

    def __init__(
        self,
        servicer: DiffusionServicer,
        telemetry: TelemetryInterceptor,
        config: ServerConfig,
        limiter: FailedAuthLimiter | None,
    ) -> None:
        self.servicer = servicer
        self.telemetry = telemetry
        self.config = config
        self.limiter = limiter or FailedAuthLimiter()  # the gRPC token check's: guesses count across both doors
        self.accepting = True  # False once the drain sent GOAWAY: a kept-alive connection's next call gets 503
        self.port: int | None = None
        app = web.Application(client_max_size=config.max_message_bytes, middlewares=[_shaped_errors])
        app.router.add_post(GENERATIONS, self._route("POST " + GENERATIONS, self._generations))
        app.router.add_post(EDITS, self._route("POST " + EDITS, self._edits))
        app.router.add_get(MODELS, self._route("GET " + MODELS, self._models))
        app.router.add_get(MODELS + "/{model:.+}", self._route("GET " + MODELS + "/{model}", self._model))
        # No access log: each request gets the one line all requests get (TelemetryInterceptor.ended).
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        self._site: web.SockSite | None = None

    async def start(self) -> int:
        await self._runner.setup()
        listening = listen(self.config.http_address, self.config.http_port or 0)
        self._site = web.SockSite(self._runner, listening, ssl_context=ssl_context(self.config))
        await self._site.start()
        self.port = listening.getsockname()[1]
        return self.port

    async def stop_accepting(self) -> None:
        """No new connections, and no new calls on open ones (503); calls in flight go on."""
        self.accepting = False
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def close(self) -> None:
        await self._runner.cleanup()

    # --- one request ------------------------------------------------------------------------------------------

    def _route(
        self, rpc: str, handler: Callable[[web.Request, _Outcome], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Around each handler: the request id, the token check, admission, one status for any error, and the
        request's metrics and log line however it ends (a disconnect cancels the handler: CANCELLED)."""

        async def serve(request: web.Request) -> web.StreamResponse:
            request_scope = scope.RequestScope(request_id(request.headers.get(REQUEST_ID_HEADER)), rpc)
            token = scope.current.set(request_scope)
            self.telemetry.began()
            started = time.perf_counter()
            outcome = _Outcome()
            try:
                self._authenticate(request)
                if not self.accepting:
                    raise Unavailable("the server is shutting down")
                with self.servicer.admit(), self.servicer.spans.server(rpc, request.headers):
                    response = await handler(request, outcome)
            except asyncio.CancelledError:  # the client disconnected (handler_cancellation)
                outcome.code, outcome.status = "CANCELLED", 499
                raise
            except ConnectionError:  # it disconnected as an event was written: nobody reads an answer
                outcome.code, outcome.status = "CANCELLED", 499
                return web.Response(status=499)
            except Exception as exc:
                error = http_error(_as_http(exc))
                outcome.code, outcome.status = error.grpc_code, error.status
                response = error_response(error)
            finally:
                extra = {"http_status": outcome.status}
                elapsed = time.perf_counter() - started
                self.telemetry.ended(request_scope, outcome.code, elapsed, outcome.prompt, extra)
                scope.current.reset(token)
            if not response.prepared:  # a stream sent its headers, the id among them, with its first event
                response.headers[REQUEST_ID_HEADER] = request_scope.request_id
            return response

        return serve

    def _authenticate(self, request: web.Request) -> None:
        """The gRPC door's rule: `Authorization: Bearer <token>` when the server has one, and a peer that failed
        too often is refused for a while (429), right token or not. Checked from the headers alone: the body of a
        refused call is never read."""
        if not self.config.auth_token:
            return
        peer = peer_of(request)
        if self.limiter.limited(peer):
            raise limited_error()
        if not token_matches(request.headers.get("Authorization", ""), self.config.auth_token):
            self.limiter.failed(peer)
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)

    # --- the endpoints ----------------------------------------------------------------------------------------

    async def _generations(self, request: web.Request, outcome: _Outcome) -> web.StreamResponse:
        raw = await _json_body(request)
        form = Form.of(raw, openai_api.GENERATION_FIELDS, from_text=False)
        outcome.prompt = str(form.get("prompt") or "")
        call = openai_api.generation_call(form, self.servicer.registry)
        return await self._answer(request, call, outcome)

    async def _edits(self, request: web.Request, outcome: _Outcome) -> web.StreamResponse:
        if request.content_type != "multipart/form-data":
            raise bad_field(None, "send the edit as multipart/form-data (image files, a mask, and the fields)")
        posted = await request.post()
        texts, images, mask = _form_parts(posted)
        form = Form.of(texts, openai_api.EDIT_FIELDS, from_text=True)
        outcome.prompt = str(form.get("prompt") or "")
        if mask is not None:
            max_pixels = self.servicer.limits.max_input_pixels
            mask = await self._off_loop(functools.partial(imaging.mask_from_alpha, max_pixels=max_pixels), mask)
        call = openai_api.edit_call(form, self.servicer.registry, images, mask)
        return await self._answer(request, call, outcome)

    async def _models(self, request: web.Request, outcome: _Outcome) -> web.StreamResponse:
        return web.json_response(openai_api.models_reply(self.servicer.registry))

    async def _model(self, request: web.Request, outcome: _Outcome) -> web.StreamResponse:
        return web.json_response(openai_api.model_entry(self.servicer.resolve(request.match_info["model"])))

    # --- answers ----------------------------------------------------------------------------------------------

    async def _answer(self, request: web.Request, call: ImagesCall, outcome: _Outcome) -> web.StreamResponse:
        client = self._client(request)
        if not call.stream:
            job, results = await self.servicer.generate(call.request, None, client, None)
            response = await self.servicer.encode(job, results)
            body = await self._off_loop(openai_api.images_reply, job, response, call)
            return web.json_response(body)
        return await self._stream(request, call, client, outcome)

    async def _stream(
        self, request: web.Request, call: ImagesCall, client: str, outcome: _Outcome
    ) -> web.StreamResponse:
        """Server-sent events: partial images from the first image's denoising steps, then one completed event
        per image. The stream opens with its first event: an error before that is a plain status (a bad field is
        a 400, a full queue a 429), one after it an `error` event."""
        previews: asyncio.Queue[Any] = asyncio.Queue()
        progress = _partials(asyncio.get_running_loop(), previews, call.partial_images) if call.partial_images else None
        work = asyncio.ensure_future(self.servicer.generate(call.request, None, client, progress))
        stream: web.StreamResponse | None = None
        sent = 0
        getter: asyncio.Future[Any] | None = None
        try:
            while not work.done():
                getter = asyncio.ensure_future(previews.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                ready = [getter.result()] if getter.done() else []
                while work.done() and not previews.empty():  # previews sent before the result was set
                    ready.append(previews.get_nowait())
                for preview in ready:
                    stream = stream or await _open_stream(request)
                    await stream.write(await self._off_loop(_partial, call, sent, preview))
                    sent += 1
            try:
                job, results = work.result()
                response = await self.servicer.encode(job, results)
            except Exception as exc:
                if stream is None:
                    raise
                error = http_error(exc)
                outcome.code, outcome.status = error.grpc_code, stream.status
                await stream.write(openai_api.sse_error(error))
                return stream
            events = await self._off_loop(openai_api.completed_events, job, response, call)
            stream = stream or await _open_stream(request)
            for event in events:
                await stream.write(openai_api.sse(event))
            await stream.write_eof()
            return stream
        finally:  # the client may have gone: stop the work and the pending read
            work.cancel()
            if getter is not None:
                getter.cancel()

    def _client(self, request: web.Request) -> str:
        """Who asks, for the queue's per-client share, by the gRPC door's rule (`DiffusionServicer.client_of`)."""
        common_name = _common_name(_peer_certificate(request))
        return self.servicer.client_of(request.headers, common_name, peer_of(request))

    async def _off_loop(self, work: Callable[..., Any], *args: Any) -> Any:
        return await self.servicer.off_loop(work, *args)


# --- helpers -------------------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (`::` listens on IPv4 too), or a ConfigError naming the flag."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        dual = family == socket.AF_INET6 and host in ("", "::") and socket.has_dualstack_ipv6()
        return socket.create_server(address[:2], family=family, dualstack_ipv6=dual, backlog=256)
    except OSError as exc:
        raise ConfigError(f"--http-port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def peer_of(request: web.Request) -> str:
    """The caller's address without its port, as the gRPC door writes it (`ipv4:10.0.0.1`), so the failed-auth
    budget is one per address whichever door it knocks on."""
    remote = request.remote or ""
    if not remote:
        return "unknown"
    return f"ipv6:[{remote}]" if ":" in remote else f"ipv4:{remote}"


def _peer_certificate(request: web.Request) -> Any:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_object.getpeercert() if ssl_object is not None else None


def _common_name(certificate: Any) -> str | None:
    for entry in (certificate or {}).get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None


def error_response(error: HttpError) -> web.Response:
    response = web.json_response(error.body(), status=error.status)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _as_http(exc: BaseException) -> BaseException:
    """aiohttp's own refusals (a body over the message limit, say) in this API's shape."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return HttpError(
            413,
            f"the request body is over the server's limit ({exc.text or 'too large'}; --max-message-mb)",
            code="request_too_large",
            grpc_code="RESOURCE_EXHAUSTED",
        )
    if isinstance(exc, imaging.ImageDecodeError):
        return bad_field("mask", str(exc))
    return exc


@web.middleware
async def _shaped_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Routing's refusals (no such path, a wrong method) in OpenAI's error shape too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        said = f"{request.method} {cut(request.path, 128)}: {exc.reason}"
        return error_response(HttpError(exc.status, said, code=exc.reason.lower().replace(" ", "_")))


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise bad_field(None, "send the request as JSON (Content-Type: application/json)")
    data = await request.read()
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_field(None, f"the body is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise bad_field(None, "the body must be a JSON object")
    return body


def _form_parts(posted: MultiDictProxy[Any]) -> tuple[dict[str, Any], list[bytes], bytes | None]:
    """A multipart edit: its text fields, its image files (`image` or `image[]`, in order) and its mask file."""
    texts: dict[str, Any] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    lora_parts: list[tuple[str, str]] = []
    for name, value in posted.items():
        is_file = isinstance(value, web.FileField)
        if name in ("image", "image[]"):
            if not is_file:
                raise bad_field("image", "must be an image file (a multipart file part)")
            images.append(value.file.read())
        elif name == "mask":
            if not is_file:
                raise bad_field("mask", "must be an image file (a multipart file part)")
            mask = value.file.read()
        elif is_file:
            raise bad_field(cut(name, 64), "is not a file field of this endpoint")
        elif name.startswith("loras[]"):
            lora_parts.append((name, value))
        elif name in texts:
            raise bad_field(cut(name, 64), "is given twice")
        else:
            texts[name] = value
    if lora_parts:
        if "loras" in texts:
            raise bad_field("loras", "is given twice")
        texts["loras"] = openai_api.form_loras(lora_parts)
    return texts, images, mask


def _partials(loop: asyncio.AbstractEventLoop, previews: asyncio.Queue[Any], count: int) -> Callable[[StepEvent], None]:
    """A progress callback for the worker thread: at the chosen steps, a small picture of the latents (made there,
    while they are valid), handed to the loop; encoding it waits for the codec threads."""
    chosen: list[int] | None = None

    def on_step(event: StepEvent) -> None:
        nonlocal chosen
        if chosen is None:
            chosen = openai_api.partial_steps(event.total, count)
        if event.step in chosen:
            preview = imaging.latent_preview(event.latents)
            if preview is not None:
                loop.call_soon_threadsafe(previews.put_nowait, preview)

    return on_step


def _partial(call: ImagesCall, index: int, preview: Any) -> bytes:
    """A partial image event: the latent preview at the output's size, in the output's format."""
    size = (preview.width * LATENT_SCALE, preview.height * LATENT_SCALE)
    picture = preview.resize(size, Image.Resampling.BILINEAR)
    encoded = imaging.encode(picture, MIME_TYPES.get(call.output_format, imaging.PNG))
    return openai_api.sse(openai_api.partial_event(call, index, encoded.data, *size))


async def _open_stream(request: web.Request) -> web.StreamResponse:
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    request_scope = scope.get()
    if request_scope is not None:
        stream.headers[REQUEST_ID_HEADER] = request_scope.request_id
    await stream.prepare(request)
    return stream
