"""OpenTelemetry tracing, configured by the standard `OTEL_*` environment variables, and off when they are unset.

`configure` reads `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`; several comma-separated) and builds a tracer
provider with `OTEL_SERVICE_NAME` (and `OTEL_RESOURCE_ATTRIBUTES`); the OTLP exporter reads its own
`OTEL_EXPORTER_OTLP_*` variables. The RPC span comes from `opentelemetry-instrumentation-grpc`'s server
interceptor, which honours a client's W3C `traceparent`; an HTTP API request's span from `RequestSpans.server`.
`RequestSpans` adds ours under either: validation (with input-image decoding), each image's queue wait, its
denoising (the pipeline call, or each step-engine tick it took part in, with rows and items), and the reply's
encoding. The engines run on worker threads, so their spans are written when the request ends, from the times
its items recorded; nothing of this runs when tracing is off.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from batching import WorkItem

from .config import ConfigError

TRACER = "diffusers_grpc"
EXPORTERS = ("otlp", "console", "none")


def configure(environ: Mapping[str, str] = os.environ) -> Any:
    """A tracer provider from the environment, or None when no exporter is asked for."""
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    names = [name for name in names if name != "none"]
    if not names:
        return None
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {', '.join(unknown)}; known: {', '.join(EXPORTERS)}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the service name is the environment's, else ours.
    provider = TracerProvider(
        resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "diffusers-grpc"})
    )
    for name in names:
        if name == "console":
            exporter: Any = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def server_interceptor(provider: Any) -> Any:
    """The RPC span of every call (W3C `traceparent` from the client's metadata as its parent)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor(tracer_provider=provider)


class RequestSpans:
    """Our spans under a request's RPC span; a no-op without a provider."""

    def __init__(self, provider: Any) -> None:
        self.tracer = provider.get_tracer(TRACER) if provider is not None else None

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A live span in the current context (the RPC's), or nothing when tracing is off."""
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def server(self, name: str, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
        """The HTTP API's request span, as the gRPC interceptor makes the RPC's: a SERVER span under the client's
        W3C `traceparent` header, current while the request is served (ours go under it)."""
        if self.tracer is None:
            return contextlib.nullcontext()
        from opentelemetry import propagate, trace

        parent = propagate.extract(headers)
        return self.tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER)

    def watch(self, items: Sequence[WorkItem]) -> None:
        """Ask the step engine to record the ticks these items take part in."""
        if self.tracer is not None:
            for item in items:
                item.trace.ticks = []

    def record(self, items: Sequence[WorkItem], engine: str, clock_now: float) -> None:
        """Each item's queue wait and denoising, as child spans of the current one, from its recorded times
        (`clock_now`: the engines' clock now, to place them on the wall clock)."""
        if self.tracer is None:
            return
        offset = time.time_ns() - int(clock_now * 1e9)

        def at(moment: float) -> int:
            return offset + int(moment * 1e9)

        for index, item in enumerate(items):
            trace = item.trace
            if not trace.started:
                continue
            queued = trace.started - trace.queue_wait
            self.tracer.start_span("queue", start_time=at(queued), attributes={"image": index}).end(at(trace.started))
            name = "step engine" if engine == "step" else "pipeline call"
            attributes = {"image": index, "batch_size": trace.batch_size}
            denoise = self.tracer.start_span(name, start_time=at(trace.started), attributes=attributes)
            with _current(denoise):
                for start, stop, rows, count in trace.ticks or ():
                    tick = self.tracer.start_span(
                        "tick", start_time=at(start), attributes={"rows": rows, "items": count}
                    )
                    tick.end(at(stop))
            denoise.end(at(trace.finished))


@contextlib.contextmanager
def _current(span: Any) -> Iterator[None]:
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield
