"""Step-level batching through a real in-process server: a short request does not wait for a long one, sets of
different sizes share the worker fairly, cancelled and expired items leave at the next step while their
batch-mates go on, and GetModel says which engine serves each signature."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from helpers import decode
from inprocess import running_server

from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb


def stream(client, steps: int, size: int = 64, seed: int = 1):
    params = pb.GenerationParams(seed=seed, num_inference_steps=steps, height=size, width=size)
    return client.stub.Stream(
        pb.StreamRequest(text_to_image=pb.TextToImageRequest(prompt="x", params=params)), timeout=120
    )


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(client):
    long = stream(client, 120)
    assert next(long).progress.step == 1  # the long request is denoising
    short = client.text_to_image("a fox", seed=3, steps=4)  # joins at the next step, leaves after four
    progress = next(long).progress
    assert progress.total_steps == 120 and progress.step < 120  # the long one is still running
    long.cancel()
    alone = client.text_to_image("a fox", seed=3, steps=4)
    assert np.abs(decode(short.images[0].image.data) - decode(alone.images[0].image.data)).max() <= 1


def test_sets_of_different_sizes_take_turns(client):
    big = stream(client, 120, size=64)
    assert next(big).progress.step == 1
    small = client.text_to_image("a hut", seed=4, steps=6, height=32, width=32)  # another latent shape: its own set
    assert (small.images[0].image.width, small.images[0].image.height) == (32, 32)
    assert next(big).progress.step < 120  # it finished while the 64x64 set was still denoising
    big.cancel()


def test_an_expired_item_leaves_with_deadline_exceeded_and_its_batch_mate_goes_on(client):
    mate = client.stub.TextToImage.future(
        pb.TextToImageRequest(prompt="mate", params=pb.GenerationParams(seed=9, num_inference_steps=30)), timeout=120
    )
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.TextToImage(
            pb.TextToImageRequest(prompt="late", params=pb.GenerationParams(seed=8, num_inference_steps=150)),
            timeout=0.5,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    together = mate.result(timeout=120)
    alone = client.text_to_image("mate", seed=9, steps=30)
    assert np.abs(decode(together.images[0].image.data) - decode(alone.images[0].image.data)).max() <= 1


def test_get_model_reports_the_engine_of_each_signature(store, client):
    assert {s.name: s.engine for s in client.get_model().model.signatures} == {
        "__call__": "step",
        "img2img": "step",
        "inpaint": "step",
    }
    with running_server(store, batching="request") as (_, target), DiffusionClient(target) as other:
        assert {s.engine for s in other.get_model().model.signatures} == {"request"}
