"""Qwen-Image and Z-Image through a real in-process server: both on the step engine, concurrent mixed requests
each equal to its direct call, GetModel reporting what a call without those arguments uses, and a request
without a size getting the pipeline's own default size."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from helpers import bad_request_fields
from inprocess import running_server
from PIL import Image
from test_dit_serving import picture, same

from model_store import ModelStore
from model_store.tiny_qwen import build_tiny_qwen_image, build_tiny_z_image
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

STEP = {"__call__": {"batchable": True}, "img2img": {"batchable": True}}
TAGS = ("tiny-qwen-image", "tiny-z-image")


@pytest.fixture(scope="module")
def qwen_store(tmp_path_factory):
    home = ModelStore(tmp_path_factory.mktemp("qwen-serving"))
    home.save_model("tiny-qwen-image", build_tiny_qwen_image(seed=0), signatures=STEP)
    home.save_model("tiny-z-image", build_tiny_z_image(seed=0), signatures=STEP)
    return home


@pytest.fixture(scope="module")
def client(qwen_store):
    with running_server(qwen_store, tags=TAGS, max_batch_size=8) as (_, target), DiffusionClient(target) as c:
        yield c


@pytest.fixture(scope="module")
def direct(qwen_store):
    return {name: qwen_store.get(name).load_pipeline("cpu") for name in TAGS}


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_both_are_on_the_step_engine_and_report_their_pipelines_defaults(client):
    qwen = client.stub.GetModel(pb.GetModelRequest(model="tiny-qwen-image"), timeout=30).model
    assert {s.name: s.engine for s in qwen.signatures} == {"__call__": "step", "img2img": "step"}
    assert (qwen.default_height, qwen.default_width) == (512, 512)  # default_sample_size 128 x the VAE's 4
    assert qwen.default_num_inference_steps == 50
    z_image = client.stub.GetModel(pb.GetModelRequest(model="tiny-z-image"), timeout=30).model
    assert {s.engine for s in z_image.signatures} == {"step"}
    assert (z_image.default_height, z_image.default_guidance_scale) == (1024, 5.0)  # `height or 1024`


REQUESTS = [
    ("tiny-qwen-image", {"prompt": "a red barn"}, {"seed": 1, "steps": 4}),
    ("tiny-qwen-image", {"prompt": "a blue lake at dawn", "negative_prompt": "blurry"}, {"seed": 2, "steps": 5}),
    ("tiny-qwen-image", {"prompt": "an old tree", "negative_prompt": "dark"}, {"seed": 3, "steps": 3,
                                                                               "true_cfg_scale": 2.0}),
    ("tiny-z-image", {"prompt": "a hill"}, {"seed": 4, "steps": 3, "guidance_scale": 0.0}),
    ("tiny-z-image", {"prompt": "a harbour", "negative_prompt": "fog"}, {"seed": 5, "steps": 4}),
    ("tiny-z-image", {"prompt": "a cat on a wall"}, {"seed": 6, "steps": 5, "guidance_scale": 3.0}),
]  # fmt: skip


def test_concurrent_mixed_requests_each_equal_their_direct_call(client, direct):
    def send(model: str, texts: dict, fields: dict) -> pb.TextToImageResponse:
        return client.text_to_image(model=model, width=32, height=32, max_sequence_length=64, **texts, **fields)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        replies = list(pool.map(lambda r: send(*r), REQUESTS))
    for (model, texts, fields), reply in zip(REQUESTS, replies):
        kwargs = {k: v for k, v in fields.items() if k not in ("seed", "steps")}
        expected = direct[model](
            **texts, **kwargs, height=32, width=32, num_inference_steps=fields["steps"], max_sequence_length=64,
            generator=generator(fields["seed"]),
        ).images[0]  # fmt: skip
        same(reply.images[0], expected)


@pytest.mark.parametrize("model", TAGS)
def test_image_to_image_equals_the_direct_call(client, direct, model):
    from diffusers import AutoPipelineForImage2Image

    source = picture(9, side=32)  # the input image fixes the size, as for every img2img model served
    reply = client.image_to_image("a city", source, model=model, seed=7, steps=4, strength=0.7)
    pipe = AutoPipelineForImage2Image.from_pipe(direct[model])
    expected = pipe(prompt="a city", image=Image.open(io.BytesIO(source)).convert("RGB"), strength=0.7,
                    num_inference_steps=4, height=32, width=32, generator=generator(7)).images[0]  # fmt: skip
    same(reply.images[0], expected)


def test_qwen_image_without_a_size_gets_the_pipelines_own_default_size(client, direct):
    reply = client.text_to_image("a red barn", model="tiny-qwen-image", seed=8, steps=1)
    expected = direct["tiny-qwen-image"](prompt="a red barn", num_inference_steps=1, generator=generator(8)).images[0]
    assert (reply.images[0].image.width, reply.images[0].image.height) == expected.size == (512, 512)
    same(reply.images[0], expected)


def test_z_image_refuses_true_cfg_scale_by_name(client):
    with pytest.raises(grpc.RpcError) as error:
        client.text_to_image("a", model="tiny-z-image", width=32, height=32, steps=1, true_cfg_scale=2.0)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "params.true_cfg_scale" in bad_request_fields(error.value)
