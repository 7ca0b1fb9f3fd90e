"""TextToImage through a real in-process gRPC server, the batching executor and the tiny diffusers pipeline."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from helpers import bad_request_fields, decode, health_status, wait_for
from inprocess import Gate, running_server

from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb


def test_image_is_a_64x64_png_with_the_resolved_tag_and_seed(client, store):
    response = client.text_to_image("a red fox", seed=7, steps=4)
    assert response.model == store.get("tiny-sd").tag
    (image,) = response.images
    assert image.seed == 7
    assert image.image.mime_type == "image/png" and (image.image.width, image.image.height) == (64, 64)
    assert decode(image.image.data).shape == (64, 64, 3)


def test_same_seed_gives_identical_bytes(client):
    first = client.text_to_image("a lighthouse", seed=123, steps=4).images[0].image.data
    second = client.text_to_image("a lighthouse", seed=123, steps=4).images[0].image.data
    other = client.text_to_image("a lighthouse", seed=124, steps=4).images[0].image.data
    assert first == second
    assert first != other


def test_server_picks_and_returns_a_seed_that_reproduces_the_image(client):
    picked = client.text_to_image("a boat", steps=4).images[0]
    again = client.text_to_image("a boat", seed=picked.seed, steps=4).images[0]
    assert again.image.data == picked.image.data


def test_num_images_gives_consecutive_seeds_each_reproducible_alone(client):
    response = client.text_to_image("a tree", seed=40, steps=4, num_images=3)
    assert [i.seed for i in response.images] == [40, 41, 42]
    alone = client.text_to_image("a tree", seed=41, steps=4).images[0]
    assert np.abs(decode(alone.image.data) - decode(response.images[1].image.data)).max() <= 1


@pytest.mark.parametrize("batching", ["request", "step"])
def test_concurrent_requests_are_batched_and_each_image_matches_its_solo_run(store, client, batching):
    prompts = [f"a painting of a {thing}" for thing in ("cat", "dog", "owl", "fox", "cow", "bee", "elk", "ant")]
    solo = [decode(client.text_to_image(p, seed=100 + i, steps=8).images[0].image.data) for i, p in enumerate(prompts)]
    gate = Gate()
    with running_server(store, max_batch_size=8, factory=gate.factory, batching=batching) as (server, target):
        stub = DiffusionClient(target).stub
        first = stub.TextToImage.future(
            pb.TextToImageRequest(prompt="first", params=pb.GenerationParams(seed=1, num_inference_steps=8))
        )
        assert gate.entered.wait(60)  # the worker is now held inside the first call (or its first step)
        futures = [
            stub.TextToImage.future(
                pb.TextToImageRequest(prompt=p, params=pb.GenerationParams(num_inference_steps=8, seed=100 + i))
            )
            for i, p in enumerate(prompts)
        ]
        wait_for(lambda: len(server.executor.queue) == 8, what="8 requests queued behind the held call")
        gate.release.set()
        first.result(timeout=120)
        batched = [decode(f.result(timeout=120).images[0].image.data) for f in futures]
    if batching == "request":
        assert gate.calls == [1, 8]  # the first call alone, then all eight together
    else:  # seven join the running item at its next step (a set holds 8), the eighth when one leaves
        assert gate.ticks[0] == 1 and max(gate.ticks) == 8 and not gate.calls
    for i, (alone, together) in enumerate(zip(solo, batched)):
        assert np.abs(alone - together).max() <= 1, f"request {i} changed when batched"


def _call(client, **params):
    return client.stub.TextToImage(
        pb.TextToImageRequest(prompt="x", model=params.pop("model", ""), params=pb.GenerationParams(**params)),
        timeout=60,
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"height": 60}, "params.height"),
        ({"width": 0}, "params.width"),
        ({"height": 4096}, "params.height"),
        ({"width": 2056}, "params.width"),
        ({"num_inference_steps": 0}, "params.num_inference_steps"),
        ({"num_inference_steps": 151}, "params.num_inference_steps"),
        ({"num_images": 17}, "params.num_images"),
        ({"guidance_scale": float("nan")}, "params.guidance_scale"),
        ({"scheduler": "NoSuchScheduler"}, "params.scheduler"),
    ],
)
def test_bad_parameters_get_invalid_argument_naming_the_field(served, client, params, field):
    with pytest.raises(grpc.RpcError) as caught:
        _call(client, **params)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert field in bad_request_fields(caught.value)
    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_is_not_found_naming_it(client):
    with pytest.raises(grpc.RpcError) as caught:
        _call(client, model="no-such-model")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in caught.value.details()


def test_malformed_model_tag_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as caught:
        _call(client, model="Bad:Tag:x")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_still_serves_after_bad_requests(served, client):
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            _call(client, height=7)
    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING
    assert client.text_to_image("fine", seed=1, steps=2).images


def test_list_models_describes_the_demo_model(client, store):
    (info,) = client.list_models().models
    assert info.tag == store.get("tiny-sd").tag
    assert info.pipeline_class == "StableDiffusionPipeline"
    assert (info.default_height, info.default_width) == (64, 64)
    by_name = {s.name: s for s in info.signatures}
    assert by_name["__call__"].batchable and by_name["__call__"].batch_dim == 0
    assert by_name["__call__"].task == "text2img"
    assert "DDIMScheduler" in info.schedulers and info.default_scheduler == "DDIMScheduler"


def test_concurrent_clients_all_get_their_own_seed(client):
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda s: client.text_to_image("x", seed=s, steps=2), range(200, 206)))
    assert [r.images[0].seed for r in responses] == list(range(200, 206))
