"""Prometheus metrics and one structured log line per request, from a server interceptor and the executor's
batch reports. Each server has its own CollectorRegistry, so several can run in one process (tests)."""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from batching import BatchReport, ItemOutput

from . import scope
from .errors import FieldViolation, InvalidArgument
from .security import PUBLIC_METHODS
from .servicer import REQUEST_ID_HEADER, abort

log = logging.getLogger("diffusers_grpc.requests")
PREFIX = "diffusers_grpc_"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """The service's Prometheus metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}requests", "RPCs by model, method and status code", ["model", "rpc", "code"], registry=r
        )
        self.latency = Histogram(
            f"{PREFIX}request_latency_seconds", "RPC latency", ["model", "rpc"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            f"{PREFIX}queue_wait_seconds",
            "time items wait in the batch queue",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}batch_size",
            "items per pipeline call or denoising step",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.tick_rows = Histogram(
            f"{PREFIX}tick_rows", "denoiser rows per step-engine tick", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.active_items = Gauge(
            f"{PREFIX}active_items", "items the step engine holds, by worker", ["worker"], registry=r
        )
        self.join_wait = Histogram(
            f"{PREFIX}join_wait_seconds",
            "time from an item joining the step engine to its first denoising step",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            f"{PREFIX}inference_seconds", "pipeline call time", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tick_seconds = Histogram(
            f"{PREFIX}tick_seconds",
            "step-engine tick time: one denoiser call, and the decode of the items it finished",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(f"{PREFIX}images", "images made by the typed tasks", ["model"], registry=r)
        self.denoising_steps = Counter(
            f"{PREFIX}denoising_steps", "denoising steps of the typed tasks' images", ["model"], registry=r
        )
        self.build_info = Gauge(
            f"{PREFIX}build_info",
            "1, labelled with what serves",
            ["version", "diffusers", "torch", "device"],
            registry=r,
        )
        # The client library's default collectors, on this registry: process_* (CPU, memory, file descriptors),
        # python_gc_* and python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.in_flight = Gauge(f"{PREFIX}in_flight_requests", "RPCs being served", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}queue_depth", "items waiting in the batch queue", registry=r)
        self.models_loaded = Gauge(f"{PREFIX}models_loaded", "models loaded and warm", registry=r)
        self.cache_steps = Counter(
            f"{PREFIX}cache_steps",
            "denoiser steps of feature-cached images, by model and outcome (computed or cached)",
            ["model", "outcome"],
            registry=r,
        )

    def record_results(self, model: str, steps: int, outputs: Sequence[ItemOutput]) -> None:
        """A typed task's images (each of `steps` denoising steps); with a feature cache, how many of their steps
        ran in full and how many reused it (the hit ratio is cached / (computed + cached))."""
        self.images.labels(model).inc(len(outputs))
        self.denoising_steps.labels(model).inc(steps * len(outputs))
        for output in outputs:
            if output.steps_cached is not None:
                self.cache_steps.labels(model, "computed").inc(output.steps_computed or 0)
                self.cache_steps.labels(model, "cached").inc(output.steps_cached)

    def record_batch(self, report: BatchReport) -> None:
        """A pipeline call or a step-engine tick. Queue waits are recorded per item when its RPC ends."""
        if report.outcome == "tick":
            self.active_items.labels(report.worker).set(report.in_flight)
            for wait in report.join_waits:
                self.join_wait.observe(wait)
            if not report.size:
                return  # the tick only let cancelled or failed items go
            model = report.model or "unknown"
            self.tick_rows.labels(model).observe(report.size)
            self.batch_size.labels(model).observe(report.active)
            self.tick_seconds.labels(model).observe(report.run_seconds)
            return
        model = report.model or "unknown"
        self.batch_size.labels(model).observe(report.size)
        self.inference.labels(model).observe(report.run_seconds)

    def watch_device_memory(self, devices: Sequence[str]) -> None:
        """On CUDA, each device's memory allocated by tensors and reserved by the caching allocator, read at
        scrape time (the workers are threads of this process)."""
        cuda = sorted({device for device in devices if device.startswith("cuda")})
        if not cuda:
            return
        memory = Gauge(
            f"{PREFIX}device_memory_bytes",
            "CUDA memory allocated by tensors and reserved by the allocator, by device",
            ["device", "kind"],
            registry=self.registry,
        )
        for device in cuda:
            memory.labels(device, "allocated").set_function(functools.partial(_cuda_memory, device, "allocated"))
            memory.labels(device, "reserved").set_function(functools.partial(_cuda_memory, device, "reserved"))

    def describe_build(self, device: str) -> None:
        """The build-info series: this server's version, diffusers and torch, and the device it serves on."""
        from importlib.metadata import PackageNotFoundError, version

        def installed(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "unknown"

        self.build_info.labels(installed("diffusers-grpc"), installed("diffusers"), installed("torch"), device).set(1)

    def serve_http(self, port: int, host: str) -> Any:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Request id (from x-request-id or generated, echoed in trailing metadata), metrics and one log line per RPC."""

    def __init__(self, metrics: Metrics | None, json_logs: bool) -> None:
        self.metrics = metrics
        self.json_logs = json_logs
        self.in_flight = 0  # RPCs between start and answer; the drain waits for zero (event loop only)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(PUBLIC_METHODS):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        metadata = dict(details.invocation_metadata or ())
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._observe(rpc, metadata, request, context):
                    if isinstance(request, Unparsable):
                        await _refuse(context, request)
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=parse, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._observe(rpc, metadata, request, context):
                    if isinstance(request, Unparsable):
                        await _refuse(context, request)
                    async for response in inner_stream(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=parse, response_serializer=handler.response_serializer
            )
        # Request-streaming handlers: no DiffusionService RPC is one, but the token check refuses with one (so it
        # never reads a refused call's message).
        if handler.stream_unary is not None:
            inner_client = handler.stream_unary

            async def client_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._observe(rpc, metadata, None, context):
                    return await inner_client(requests, context)

            return grpc.stream_unary_rpc_method_handler(client_stream, response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_both = handler.stream_stream

            async def both_streams(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._observe(rpc, metadata, None, context):
                    async for response in inner_both(requests, context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(both_streams, response_serializer=handler.response_serializer)
        return handler

    def _observe(
        self, rpc: str, metadata: dict[str, Any], request: Any, context: grpc.aio.ServicerContext
    ) -> _Observation:
        request_scope = scope.RequestScope(request_id(metadata.get(REQUEST_ID_HEADER)), rpc)
        return _Observation(self, request_scope, request, context)

    def began(self) -> None:
        """A request (an RPC, or a call of the HTTP API) started: it is in flight until `ended`."""
        self.in_flight += 1
        if self.metrics:
            self.metrics.in_flight.inc()

    def ended(
        self, s: scope.RequestScope, code: str, elapsed: float, prompt: Any = "", extra: dict[str, Any] | None = None
    ) -> None:
        """Count, time and log one request that ended with `code` (a gRPC status name, whichever door it came in
        by). `extra`: fields of the log line that only one door has."""
        self.in_flight -= 1  # first: nothing below may keep an ended request counted
        metrics = self.metrics
        if metrics:
            metrics.in_flight.dec()
            # Labels only take values the server knows: a served tag, or "unknown" (never a client's string).
            metrics.requests.labels(s.model or "unknown", s.rpc, code).inc()
            metrics.latency.labels(s.model or "unknown", s.rpc).observe(elapsed)
            for item in s.items:
                if item.trace.started:  # it left the queue (to run, or to join the step engine)
                    metrics.queue_wait.labels(s.model or "unknown").observe(item.trace.queue_wait)
        fields: dict[str, Any] = {
            "request_id": s.request_id,
            "rpc": s.rpc,
            "model": s.model or "-",
            "code": code,
            **(extra or {}),
            "ms": round(elapsed * 1e3, 2),
            "queue_ms": round(s.queue_ms(), 2),
            "run_ms": round(s.run_ms(), 2),
            "batch_size": s.batch_size(),
            "images": len(s.items),
        }
        if code == "UNAUTHENTICATED":  # counted; the token check logs one sampled line per peer, not one per guess
            pass
        elif log.isEnabledFor(logging.DEBUG):  # prompts are private: only at DEBUG, and cut
            fields["prompt"] = str(prompt or "")[:200]
            log.debug(self._format(fields))
        else:
            log.info(self._format(fields))

    def _format(self, fields: dict[str, Any]) -> str:
        if self.json_logs:
            return json.dumps(fields)
        return " ".join(f"{k}={v}" for k, v in fields.items())


def request_id(given: Any) -> str:
    """The client's request id when it is tame (from x-request-id), else a new one."""
    text = str(given or "")
    return text if _REQUEST_ID.fullmatch(text) else uuid.uuid4().hex


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


@dataclass(frozen=True)
class Unparsable:
    """A request body that is not a valid message (corrupt, or nested deeper than protobuf decodes)."""

    reason: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The handler's deserializer, returning Unparsable instead of raising: grpc would answer UNKNOWN."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return Unparsable(f"{type(exc).__name__}: {str(exc)[:200]}")

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: Unparsable) -> None:
    await abort(context, InvalidArgument.of([FieldViolation("request", f"not a valid message ({request.reason})")]))


class _Observation:
    """Times one RPC and reports it when it ends, however it ends."""

    def __init__(
        self, owner: TelemetryInterceptor, request_scope: scope.RequestScope, request: Any, context: Any
    ) -> None:
        self.owner = owner
        self.scope = request_scope
        self.request = request
        self.context = context
        self.token: Any = None
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()
        self.token = scope.current.set(self.scope)
        self.context.set_trailing_metadata(((REQUEST_ID_HEADER, self.scope.request_id),))
        self.owner.began()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        elapsed = time.perf_counter() - self.started
        self.owner.ended(self.scope, _code_name(self.context, kind), elapsed, getattr(self.request, "prompt", ""))
        try:
            scope.current.reset(self.token)
        except ValueError:  # a cancelled stream ends in another context than it began: nothing left to undo
            pass


def _code_name(context: Any, kind: type[BaseException] | None) -> str:
    """The status the client got. A handler that ended without one ended because the call did: its deadline
    passed (DEADLINE_EXCEEDED, as the client saw it), or the client cancelled it (CANCELLED; a cancelled stream
    ends with GeneratorExit or CancelledError); anything else is UNKNOWN, a bug worth a look."""
    code = context.code()
    if code is not None:
        return str(getattr(code, "name", code))  # a grpc.StatusCode; anything else as it is
    if kind is None:
        return "OK"
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return "DEADLINE_EXCEEDED"
    if kind.__name__ in ("CancelledError", "GeneratorExit") or context.cancelled():
        return "CANCELLED"
    return "UNKNOWN"


def rfc3339(record: logging.LogRecord) -> str:
    """The record's time in RFC 3339, UTC, to the millisecond: `2026-12-01T07:37:55.625Z`."""
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _request_id() -> str | None:
    """The id of the request whose context logs this line, if any (worker threads have none)."""
    request = scope.current.get()
    return request.request_id if request is not None else None


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time (RFC 3339, UTC), level, logger, message, and the request id when the
    line is logged for a request. Request lines add their fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, Any] = {"time": rfc3339(record), "level": record.levelname, "logger": record.name}
        if record.name == log.name and message.startswith("{"):  # a request line: its fields, already JSON
            return json.dumps({**data, "message": "request", **json.loads(message)})
        data["message"] = bounded(message)
        request_id = _request_id()
        if request_id:
            data["request_id"] = request_id
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


class TextFormatter(logging.Formatter):
    """One line per message, whatever it holds: control characters (a newline in a client's string) are escaped.
    A traceback, added after the message, keeps its lines."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record)

    def format(self, record: logging.LogRecord) -> str:
        message, args = record.msg, record.args
        escaped = _CONTROL.sub(lambda m: repr(m.group())[1:-1], bounded(record.getMessage()))
        request_id = _request_id()
        if request_id and record.name != log.name:  # request lines carry theirs already
            escaped += f" request_id={request_id}"
        record.msg, record.args = escaped, None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = message, args


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
MAX_MESSAGE_CHARS = 4096  # a log message, whoever wrote it: a library quoting a client's value cannot flood the log


def bounded(message: str) -> str:
    """The message, cut to MAX_MESSAGE_CHARS with the number of characters left out."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"


class PromptFilter(logging.Filter):
    """Drops library log records that quote a prompt (CLIP's truncation warning): prompts are private, and the
    client hears of a truncated prompt in its reply's warnings."""

    QUOTES_PROMPT = ("The following part of your input was truncated",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.QUOTES_PROMPT)


def configure_logging(log_format: str, level: str) -> None:
    """One handler for every line the server writes: ours, the libraries' and Python warnings alike, so each is
    formatted (text or JSON), escaped, and stripped of prompt quotes."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PromptFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    for library in LIBRARY_LOGGING:
        _route_to_root(library)


LIBRARY_LOGGING = ("diffusers.utils.logging", "transformers.utils.logging")


def _route_to_root(module_name: str) -> None:
    """diffusers and transformers write through handlers of their own (unformatted, unfiltered: CLIP's truncation
    warning quoted whole prompts into the log), and draw progress bars: send their records to ours instead."""
    try:
        library = importlib.import_module(module_name)
    except ImportError:
        return
    library.disable_default_handler()
    library.enable_propagation()
    library.disable_progress_bar()


def _cuda_memory(device: str, kind: str) -> float:
    import torch

    read = torch.cuda.memory_allocated if kind == "allocated" else torch.cuda.memory_reserved
    return float(read(device))
