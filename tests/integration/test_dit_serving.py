"""The 2026 families through a real in-process server: FLUX.1 and SD3 on the step engine (concurrent mixed
requests, each equal to its direct call), their new fields (prompt_3, true_cfg_scale, max_sequence_length), the
Edit RPC, pipeline defaults in GetModel and for requests that leave them out, DiT class labels through Call,
and PixArt-Sigma, whose own defaults fail, still reaching SERVING."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from helpers import bad_request_fields, decode, health_status
from inprocess import running_server
from PIL import Image
from test_api_tasks import png

from model_store import ModelStore
from model_store.tiny_dit import (
    build_tiny_dit,
    build_tiny_flux,
    build_tiny_lumina2,
    build_tiny_pixart_sigma,
    build_tiny_sd3,
)
from model_store.tiny_families import build_tiny_instruct_pix2pix
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

STEP = {"__call__": {"batchable": True}, "img2img": {"batchable": True}}


@pytest.fixture(scope="module")
def dit_store(tmp_path_factory, store):
    home = ModelStore(tmp_path_factory.mktemp("dit-serving"))
    home.save_model("tiny-flux", build_tiny_flux(seed=0), signatures=STEP)
    home.save_model("tiny-sd3", build_tiny_sd3(seed=0), signatures=STEP)
    home.save_model("tiny-pix2pix", build_tiny_instruct_pix2pix(seed=0), signatures={"__call__": {"batchable": True}})
    home.save_model("tiny-dit", build_tiny_dit(seed=0))
    home.save_model("tiny-pixart", build_tiny_pixart_sigma(seed=0))
    home.save_model("tiny-lumina2", build_tiny_lumina2(seed=0))
    home.import_model("tiny-sd", store.get("tiny-sd").path)
    return home


@pytest.fixture(scope="module")
def served(dit_store):
    tags = ("tiny-flux", "tiny-sd3", "tiny-pix2pix", "tiny-dit", "tiny-pixart", "tiny-lumina2", "tiny-sd")
    with running_server(dit_store, tags=tags, max_batch_size=8) as (server, target):
        yield server, target


@pytest.fixture(scope="module")
def client(served):
    with DiffusionClient(served[1]) as c:
        yield c


@pytest.fixture(scope="module")
def direct(dit_store):
    return {name: dit_store.get(name).load_pipeline("cpu") for name in ("tiny-flux", "tiny-sd3", "tiny-pix2pix")}


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def same(reply_image: pb.GeneratedImage, pil: Image.Image) -> None:
    served_pixels, direct_pixels = decode(reply_image.image.data), np.asarray(pil.convert("RGB"), dtype=np.int16)
    assert served_pixels.shape == direct_pixels.shape
    assert np.abs(served_pixels - direct_pixels).max() <= 1


def picture(seed: int, side: int = 16) -> bytes:
    return png(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB"))


def test_flux_and_sd3_are_on_the_step_engine_and_report_their_pipelines_defaults(client):
    flux = client.stub.GetModel(pb.GetModelRequest(model="tiny-flux"), timeout=30).model
    assert {s.name: s.engine for s in flux.signatures} == {"__call__": "step", "img2img": "step"}
    # The closed sets beside the strings.
    assert {s.engine_enum for s in flux.signatures} == {pb.ENGINE_STEP}
    assert [s.task_enum for s in flux.signatures] == [pb.TASK_TEXT2IMG, pb.TASK_IMG2IMG]
    assert (flux.dtype, flux.dtype_enum) == ("float32", pb.DTYPE_FLOAT32)
    assert (flux.default_num_inference_steps, flux.default_guidance_scale) == (28, 3.5)  # FluxPipeline.__call__'s
    assert (flux.default_height, flux.default_width) == (128, 128)  # default_sample_size 128 x vae_scale_factor 1
    img2img = next(s for s in flux.signatures if s.name == "img2img")
    assert (img2img.default_guidance_scale, img2img.task) == (7.0, "img2img")  # FluxImg2ImgPipeline's own
    sd3 = client.stub.GetModel(pb.GetModelRequest(model="tiny-sd3"), timeout=30).model
    assert {s.engine for s in sd3.signatures} == {"step"}
    assert (sd3.default_height, sd3.default_guidance_scale) == (32, 7.0)
    edit = client.stub.GetModel(pb.GetModelRequest(model="tiny-pix2pix"), timeout=30).model
    assert [(s.task, s.task_enum, s.engine_enum) for s in edit.signatures] == [
        ("edit", pb.TASK_EDIT, pb.ENGINE_REQUEST)
    ]


FLUX_REQUESTS = [
    ({"prompt": "a red barn"}, {"seed": 1, "steps": 4}),
    ({"prompt": "a blue lake", "prompt_2": "in fog"}, {"seed": 2, "steps": 6, "guidance_scale": 8.0}),
    ({"prompt": "an old tree", "negative_prompt": "blurry"}, {"seed": 3, "steps": 5, "true_cfg_scale": 4.0}),
    ({"prompt": "a cat"}, {"seed": 4, "steps": 3, "max_sequence_length": 24}),
]


def test_concurrent_mixed_flux_requests_each_equal_their_direct_call(client, direct):
    def send(texts: dict, fields: dict) -> pb.TextToImageResponse:
        merged = {"max_sequence_length": 16, **fields}
        return client.text_to_image(model="tiny-flux", width=16, height=16, **texts, **merged)

    with ThreadPoolExecutor(len(FLUX_REQUESTS)) as pool:
        replies = list(pool.map(lambda r: send(*r), FLUX_REQUESTS))
    for (texts, fields), reply in zip(FLUX_REQUESTS, replies):
        kwargs = {"max_sequence_length": 16, **{k: v for k, v in fields.items() if k not in ("seed", "steps")}}
        expected = direct["tiny-flux"](
            **texts, height=16, width=16, num_inference_steps=fields["steps"], generator=generator(fields["seed"]),
            **kwargs,
        ).images[0]  # fmt: skip
        same(reply.images[0], expected)


def test_flux_without_a_size_gets_the_pipelines_own_default_size(client, direct):
    reply = client.text_to_image("a red barn", model="tiny-flux", seed=5, steps=1, max_sequence_length=16)
    expected = direct["tiny-flux"](
        prompt="a red barn", num_inference_steps=1, max_sequence_length=16, generator=generator(5)
    ).images[0]
    assert (reply.images[0].image.width, reply.images[0].image.height) == expected.size == (128, 128)
    same(reply.images[0], expected)


def test_flux_image_to_image_equals_the_direct_call(client, direct):
    from diffusers import FluxImg2ImgPipeline

    source = picture(9)
    reply = client.image_to_image("a city", source, model="tiny-flux", seed=6, steps=5, strength=0.7)
    pipe = FluxImg2ImgPipeline.from_pipe(direct["tiny-flux"], dtype=direct["tiny-flux"].dtype)
    image = Image.open(io.BytesIO(source)).convert("RGB")
    expected = pipe(prompt="a city", image=image, strength=0.7, num_inference_steps=5, height=16, width=16,
                    generator=generator(6)).images[0]  # fmt: skip
    same(reply.images[0], expected)


def test_sd3_third_prompts_reach_the_t5_encoder(client, direct):
    reply = client.text_to_image(
        "a lighthouse", model="tiny-sd3", seed=8, steps=4, prompt_3="in winter", negative_prompt="fog",
        negative_prompt_3="night", max_sequence_length=16,
    )  # fmt: skip
    expected = direct["tiny-sd3"](
        prompt="a lighthouse", prompt_3="in winter", negative_prompt="fog", negative_prompt_3="night",
        num_inference_steps=4, max_sequence_length=16, generator=generator(8),
    ).images[0]  # fmt: skip
    same(reply.images[0], expected)
    plain = client.text_to_image("a lighthouse", model="tiny-sd3", seed=8, steps=4, negative_prompt="fog",
                                 max_sequence_length=16)  # fmt: skip
    assert np.abs(decode(plain.images[0].image.data) - decode(reply.images[0].image.data)).mean() > 2


def test_fields_a_model_does_not_take_are_refused_by_name(client):
    cases = [
        (dict(model="tiny-sd", prompt_3="x"), "prompt_3"),
        (dict(model="tiny-sd", true_cfg_scale=2.0), "params.true_cfg_scale"),
        (dict(model="tiny-sd3", true_cfg_scale=2.0), "params.true_cfg_scale"),  # SD3 has no true CFG
        (dict(model="tiny-flux", max_sequence_length=0), "params.max_sequence_length"),
        (dict(model="tiny-flux", max_sequence_length=4096), "params.max_sequence_length"),
        (dict(model="tiny-flux", true_cfg_scale=float("nan")), "params.true_cfg_scale"),
    ]
    for fields, name in cases:
        with pytest.raises(grpc.RpcError) as caught:
            client.text_to_image("a cat", steps=1, width=16, height=16, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert name in bad_request_fields(caught.value), fields


def test_edit_equals_the_direct_instruct_pix2pix_call(client, direct):
    source = picture(4, side=64)
    reply = client.edit("make it snow", [source], model="tiny-pix2pix", seed=3, steps=4, negative_prompt="rain")
    image = Image.open(io.BytesIO(source)).convert("RGB")
    expected = direct["tiny-pix2pix"](
        prompt="make it snow", image=image, negative_prompt="rain", num_inference_steps=4, generator=generator(3)
    ).images[0]
    same(reply.images[0], expected)
    other = client.edit("make it snow", [picture(5, side=64)], model="tiny-pix2pix", seed=3, steps=4,
                        negative_prompt="rain")  # fmt: skip
    assert np.abs(decode(other.images[0].image.data) - decode(reply.images[0].image.data)).mean() > 2


def test_edit_streams_progress_then_its_result(client):
    request = DiffusionClient.edit_request("make it red", [picture(4, side=64)], model="tiny-pix2pix", seed=1,
                                           steps=3)  # fmt: skip
    events = list(client.stub.Stream(pb.StreamRequest(edit=request), timeout=120))
    assert [e.WhichOneof("event") for e in events] == ["progress"] * 3 + ["edit"]
    assert len(events[-1].edit.images) == 1


def test_edit_refuses_what_it_cannot_do(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.edit("make it red", [], model="tiny-pix2pix")
    assert "images" in bad_request_fields(caught.value)
    with pytest.raises(grpc.RpcError) as caught:
        client.edit("make it red", [picture(1, 64), picture(2, 64)], model="tiny-pix2pix")
    assert "images" in bad_request_fields(caught.value)  # InstructPix2Pix takes one reference image
    with pytest.raises(grpc.RpcError) as caught:
        client.edit("make it red", [picture(1)], model="tiny-flux")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Edit" in caught.value.details()


def test_call_passes_integral_numbers_as_ints_where_the_parameter_is_a_list_of_ints(client, dit_store):
    reply = client.call("__call__", {"class_labels": [1, 2], "num_inference_steps": 3}, model="tiny-dit", seed=0)
    pipe = dit_store.get("tiny-dit").load_pipeline("cpu")
    expected = pipe(class_labels=[1, 2], num_inference_steps=3, generator=generator(0)).images
    assert len(reply.images) == 2
    for got, want in zip(reply.images, expected):
        same(got, want)


def test_a_pipeline_that_refuses_its_own_defaults_still_reaches_serving(served, client, dit_store):
    """Tiny PixArt-Sigma: its resolution binning refuses its own sample size, so the warm-up call fails; the
    model serves what it accepts, as the direct call does."""
    from grpc_health.v1 import health_pb2

    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING
    arguments = {"prompt": "a cat", "num_inference_steps": 2, "height": 16, "width": 16,
                 "use_resolution_binning": False}  # fmt: skip
    reply = client.call("__call__", arguments, model="tiny-pixart", seed=2)
    pipe = dit_store.get("tiny-pixart").load_pipeline("cpu")
    expected = pipe(**arguments, generator=generator(2)).images[0]
    same(reply.images[0], expected)


def test_lumina2_serves_its_own_default_size(client, dit_store):
    """Tiny Lumina2's pipeline assumes an 8x VAE its fixture lacks: its default request makes 4x4 images, a
    size our own rule (multiples of 8) would refuse. The warm-up and a request without a size get exactly
    what the direct call makes."""
    reply = client.text_to_image("a red barn", model="tiny-lumina2", seed=4, steps=2)
    pipe = dit_store.get("tiny-lumina2").load_pipeline("cpu")
    expected = pipe(prompt="a red barn", num_inference_steps=2, generator=generator(4)).images[0]
    assert expected.size == (4, 4)
    same(reply.images[0], expected)


def test_the_generate_cli_edits_by_instruction_and_sends_the_new_fields(served, tmp_path):
    import subprocess

    from helpers import cli

    source = tmp_path / "in.png"
    source.write_bytes(picture(4, side=64))
    out = tmp_path / "edited.png"
    target = ["--target", served[1]]
    edited = subprocess.run(
        cli("generate", "make it snow", *target, "--model", "tiny-pix2pix", "--edit", str(source), "--steps", "2",
            "--seed", "1", "-o", str(out)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert edited.returncode == 0, edited.stderr
    assert out.read_bytes().startswith(b"\x89PNG") and "64x64" in edited.stdout
    refused = subprocess.run(
        cli("generate", "a cat", *target, "--model", "tiny-sd", "--prompt-3", "x", "--steps", "1", "-o", str(out)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "prompt_3" in refused.stderr
