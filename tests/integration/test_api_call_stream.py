"""Call, Stream and a custom pipeline served through the typed RPCs, on a real in-process server."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from helpers import bad_request_fields, decode, error_details, health_status, wait_for
from inprocess import running_server
from test_api_tasks import gradient, half_mask

from model_store import StoreError
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

CUSTOM = Path(__file__).resolve().parent.parent / "data" / "tiny_tasks_pipeline.py"
CUSTOM_SIGNATURES = {
    "text2img": {"batchable": True},
    "img2img": {"batchable": True},
    "inpaint": {"batchable": True},
    "upscale_noop": {},
}


@pytest.fixture(scope="module")
def custom_tag(store):
    source = store.get("tiny-sd").path
    return store.import_model(
        "tiny-tasks", source, custom_pipeline=CUSTOM, trust_remote_code=True, signatures=CUSTOM_SIGNATURES
    ).tag


@pytest.fixture(scope="module")
def served(store, custom_tag):
    with running_server(store, tags=("tiny-sd", custom_tag), max_batch_size=8, trust_remote_code=True) as (
        server,
        target,
    ):
        yield server, target


def test_custom_pipeline_is_refused_without_trust(store):
    with pytest.raises(StoreError, match="trust_remote_code"):
        store.import_model("untrusted", store.get("tiny-sd").path, custom_pipeline=CUSTOM)
    assert store.list_models("untrusted") == []


def test_call_runs_a_signature_with_struct_arguments(client):
    arguments = {"prompt": "a fox", "num_inference_steps": 4, "height": 64, "width": 64}
    reply = client.call("__call__", arguments, seed=5)
    (image,) = reply.images
    assert image.seed == 5 and (image.image.width, image.image.height) == (64, 64)
    assert image.image.mime_type == "image/png" and image.nsfw_content_detected is False
    assert dict(reply.outputs) == {}  # the pipeline's outputs were images (and no nsfw flags): nothing else
    typed = client.text_to_image("a fox", seed=5, steps=4, guidance_scale=7.5)
    assert np.abs(decode(image.image.data) - decode(typed.images[0].image.data)).max() <= 1


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"prompt": "x", "no_such_argument": 1}, "arguments.no_such_argument"),
        ({"prompt": "x", "num_inference_steps": "four"}, "arguments.num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 2.5}, "arguments.num_inference_steps"),
        ({"prompt": "x", "generator": 1}, "arguments.generator"),
    ],
)
def test_call_refuses_bad_arguments_naming_them(served, client, arguments, field):
    with pytest.raises(grpc.RpcError) as caught:
        client.call("__call__", arguments)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(caught.value)
    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING


def test_call_of_an_undeclared_signature_is_unimplemented_listing_the_signatures(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.call("enable_vae_tiling")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "__call__" in caught.value.details() and "img2img" in caught.value.details()
    info, retry = error_details(caught.value)
    assert (info.reason, info.domain, retry) == ("SIGNATURE_NOT_FOUND", "diffusion.v1", None)
    assert dict(info.metadata) == {"model": client.get_model("").model.tag, "signature": "enable_vae_tiling"}


def test_custom_pipeline_serves_the_typed_rpcs(client, custom_tag):
    text = client.text_to_image("a hill", model=custom_tag, seed=2, steps=3)
    image = client.image_to_image("a hill", gradient(), model=custom_tag, seed=2, steps=4, strength=0.5)
    paint = client.inpaint("a hill", gradient(), half_mask(), model=custom_tag, seed=2, steps=3)
    for reply in (text, image, paint):
        assert reply.model == custom_tag
        assert (reply.images[0].image.width, reply.images[0].image.height) == (64, 64)
    info = client.get_model(custom_tag).model
    assert info.pipeline_class == "TinyTasksPipeline"
    assert {s.name: s.task for s in info.signatures}["upscale_noop"] == "custom"


def test_custom_extra_method_runs_through_call_with_image_and_outputs(client, custom_tag):
    reply = client.call("upscale_noop", {"factor": 2}, images={"image": gradient(32, 32)}, model=custom_tag)
    (image,) = reply.images
    assert np.array_equal(decode(image.image.data), decode(gradient(32, 32)))
    assert list(reply.outputs.fields) == ["factor"]
    assert reply.outputs.fields["factor"].WhichOneof("kind") == "number_value"
    assert reply.outputs.fields["factor"].number_value == 2.0


def test_typed_rpc_without_such_signature_is_unimplemented(store, client):
    with running_server(store, tags=("tiny-sd",)) as (_, target), DiffusionClient(target) as other:
        assert other.text_to_image("x", seed=1, steps=2).images
    # the custom model declares no __call__: Call of it is unimplemented, naming what it has
    with pytest.raises(grpc.RpcError) as caught:
        client.call("__call__", {"prompt": "x"}, model="tiny-tasks")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "upscale_noop" in caught.value.details()


def test_stream_sends_one_progress_event_per_step_then_the_result(client):
    request = pb.TextToImageRequest(prompt="a bridge", params=pb.GenerationParams(seed=21, num_inference_steps=5))
    events = list(client.stream(request, preview_every=2, timeout=120))
    progress = [e.progress for e in events[:-1]]
    assert [e.WhichOneof("event") for e in events[:-1]] == ["progress"] * 5
    assert [p.step for p in progress] == [1, 2, 3, 4, 5] and {p.total_steps for p in progress} == {5}
    assert all(b.elapsed_seconds >= a.elapsed_seconds for a, b in itertools.pairwise(progress))
    assert [p.step for p in progress if p.preview.data] == [2, 4, 5]
    assert decode(progress[1].preview.data).shape == (8, 8, 3)
    result = events[-1].text_to_image
    unary = client.stub.TextToImage(request, timeout=60)
    assert result.images[0].image.data == unary.images[0].image.data


def test_stream_of_image_to_image_counts_the_steps_strength_runs(client):
    request = client.image_to_image_request("x", gradient(), seed=3, steps=8, strength=0.5)
    events = list(client.stream(request, timeout=120))
    assert [e.progress.step for e in events[:-1]] == [1, 2, 3, 4]
    assert events[-1].WhichOneof("event") == "image_to_image"


def test_stream_without_a_request_is_invalid(client):
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.Stream(pb.StreamRequest(), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("batching", ["step", "request"])
def test_cancelling_a_stream_stops_its_work_at_the_next_step(store, batching):
    with running_server(store, batching=batching) as (server, target), DiffusionClient(target) as client:
        request = pb.TextToImageRequest(prompt="long", params=pb.GenerationParams(seed=1, num_inference_steps=150))
        call = client.stub.Stream(pb.StreamRequest(text_to_image=request), timeout=120)
        first = next(call)
        assert first.progress.step == 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        if batching == "request":  # the worker interrupts the call at its next step (pipe._interrupt)
            wait_for(lambda: server.stats.outcomes["interrupted"] == 1, what="the call to be interrupted")
        else:  # the item leaves the running batch at the next tick
            wait_for(lambda: server.stats.outcomes["cancelled"] == 1, what="the item to leave")
            assert server.stats.outcomes["tick"] < 150  # it never ran its 150 steps
        assert client.text_to_image("after", seed=1, steps=2).images  # and the worker serves on


def test_arguments_the_pipeline_rejects_are_logged_in_one_line_without_a_traceback(client, caplog):
    """A client's bad values are the client's error: one line in the log; tracebacks are for our own bugs."""
    caplog.set_level(logging.WARNING)
    with pytest.raises(grpc.RpcError) as caught:
        client.call("__call__", {"prompt": "x", "num_inference_steps": 1, "height": 60, "width": 60})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rejected = [r for r in caplog.records if "rejected a Call's arguments" in r.getMessage()]
    assert rejected and all(r.exc_info is None and "\n" not in r.getMessage() for r in rejected)
