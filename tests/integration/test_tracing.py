"""OpenTelemetry through a real in-process server: one request's span tree under the client's W3C traceparent,
and the OTEL_* environment's configuration (off when unset)."""

from __future__ import annotations

import pytest
from inprocess import running_server

from service import tracing
from service.client import DiffusionClient
from service.config import ConfigError
from service.generated.diffusion.v1 import diffusion_pb2 as pb

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced(store):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with (
        running_server(store, tracer_provider=provider, http_port=0) as (server, target),
        DiffusionClient(target) as client,
    ):
        client.http_port = server.http.port
        yield client, exporter


def tree(exporter) -> dict:
    spans = exporter.get_finished_spans()
    return {"spans": spans, "by_id": {span.context.span_id: span for span in spans}}


def test_one_request_is_one_span_tree_under_the_clients_traceparent(traced):
    client, exporter = traced
    exporter.clear()
    request = pb.TextToImageRequest(prompt="a fox", params=pb.GenerationParams(seed=1, num_inference_steps=3))
    client.stub.TextToImage(request, metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")], timeout=60)
    spans = exporter.get_finished_spans()
    rpc = next(span for span in spans if span.name.endswith("DiffusionService/TextToImage"))
    assert format(rpc.context.trace_id, "032x") == TRACE_ID and format(rpc.parent.span_id, "016x") == PARENT_ID
    children = {
        span.name: span for span in spans if span.parent is not None and span.parent.span_id == rpc.context.span_id
    }
    assert {"validate", "queue", "step engine", "encode"} <= set(children), sorted(children)
    engine = children["step engine"]
    ticks = [span for span in spans if span.parent is not None and span.parent.span_id == engine.context.span_id]
    assert [span.name for span in ticks] == ["tick"] * 3  # one per denoising step
    assert all(span.attributes["rows"] == 2 and span.attributes["items"] == 1 for span in ticks)  # CFG: two rows
    assert children["queue"].end_time <= engine.start_time <= engine.end_time <= children["encode"].start_time
    assert all(format(span.context.trace_id, "032x") == TRACE_ID for span in spans)


def test_an_http_request_is_one_span_tree_under_its_traceparent_header(traced):
    import json
    import urllib.request

    client, exporter = traced
    exporter.clear()
    body = json.dumps({"prompt": "a fox", "seed": 1, "num_inference_steps": 2}).encode()
    headers = {"Content-Type": "application/json", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    url = f"http://127.0.0.1:{client.http_port}/v1/images/generations"
    urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60).read()
    spans = exporter.get_finished_spans()
    request = next(span for span in spans if span.name == "POST /v1/images/generations")
    assert format(request.context.trace_id, "032x") == TRACE_ID and format(request.parent.span_id, "016x") == PARENT_ID
    children = {span.name for span in spans if span.parent and span.parent.span_id == request.context.span_id}
    assert {"validate", "queue", "step engine", "encode"} <= children, sorted(children)


def test_a_call_is_traced_with_its_pipeline_call(traced):
    client, exporter = traced
    exporter.clear()
    client.call("__call__", {"prompt": "x", "num_inference_steps": 2})
    names = [span.name for span in exporter.get_finished_spans()]
    assert "pipeline call" in names and "validate" in names and any(name.endswith("/Call") for name in names)


def test_tracing_follows_the_otel_environment():
    assert tracing.configure({}) is None and tracing.configure({"OTEL_TRACES_EXPORTER": "none"}) is None
    for environ, name in (({"OTEL_SERVICE_NAME": "diffusion-east"}, "diffusion-east"), ({}, "diffusers-grpc")):
        provider = tracing.configure({"OTEL_TRACES_EXPORTER": "console", **environ})
        try:
            assert provider.resource.attributes["service.name"] == name
        finally:
            provider.shutdown()
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        tracing.configure({"OTEL_TRACES_EXPORTER": "jaeger"})
