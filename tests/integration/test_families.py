"""The model families people run, through a real in-process server: SDXL (second prompts, size conditioning,
img2img), ControlNet, and an unconditional DDPM; each image equals the direct diffusers call for that request."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers import bad_request_fields, decode, health_status
from inprocess import running_server
from PIL import Image
from test_api_tasks import gradient, png

from model_store import ModelStore
from model_store.demo import DEMO_SIGNATURES
from model_store.tiny_families import build_tiny_ddpm, build_tiny_sd_controlnet, build_tiny_sdxl
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb


@pytest.fixture(scope="module")
def family_store(tmp_path_factory, store):
    home = ModelStore(tmp_path_factory.mktemp("families"))
    home.import_model("tiny-sd", store.get("tiny-sd").path, signatures=DEMO_SIGNATURES)
    home.save_model("tiny-sdxl", build_tiny_sdxl(seed=0), signatures=DEMO_SIGNATURES)
    home.save_model("tiny-controlnet", build_tiny_sd_controlnet(seed=0), signatures={"__call__": {"batchable": True}})
    home.save_model("tiny-ddpm", build_tiny_ddpm(seed=0))  # the default signature: __call__, not batchable
    return home


@pytest.fixture(scope="module")
def served(family_store):
    tags = ("tiny-sdxl", "tiny-controlnet", "tiny-ddpm", "tiny-sd")
    with running_server(family_store, tags=tags, max_batch_size=4) as (server, target):
        yield server, target


@pytest.fixture(scope="module")
def direct(family_store):
    """The same stored pipelines, loaded as a user would, to call diffusers directly."""
    return {name: family_store.get(name).load_pipeline("cpu") for name in ("tiny-sdxl", "tiny-controlnet")}


def same(reply_image: pb.GeneratedImage, pil: Image.Image) -> None:
    served_pixels, direct_pixels = decode(reply_image.image.data), np.asarray(pil.convert("RGB"), dtype=np.int16)
    assert np.abs(served_pixels - direct_pixels).max() <= 1


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def control_image(shade: int = 40) -> bytes:
    rng = np.random.default_rng(shade)
    return png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"))


def text(model: str, prompt: str = "a lighthouse", **fields) -> pb.TextToImageRequest:
    params = fields.pop("params", pb.GenerationParams(seed=7, num_inference_steps=4))
    return pb.TextToImageRequest(model=model, prompt=prompt, params=params, **fields)


# --- SDXL -------------------------------------------------------------------------------------------------------


def test_sdxl_with_a_second_prompt_and_size_conditioning_equals_the_direct_call(client, direct):
    sizes = pb.SizeConditioning(original_height=128, original_width=96, crop_top=8, crop_left=16, target_height=64)
    params = pb.GenerationParams(seed=11, num_inference_steps=4, size_conditioning=sizes)
    reply = client.stub.TextToImage(text("tiny-sdxl", prompt_2="in winter", params=params), timeout=120)
    expected = direct["tiny-sdxl"](
        prompt="a lighthouse",
        prompt_2="in winter",
        num_inference_steps=4,
        height=64,
        width=64,
        original_size=(128, 96),
        crops_coords_top_left=(8, 16),
        target_size=(64, 64),  # the width was left out: the output width
        generator=generator(11),
    ).images[0]
    same(reply.images[0], expected)


def test_sdxl_without_a_negative_prompt_equals_the_direct_call_with_none(client, direct):
    """An empty proto string means 'not given': SDXL zeroes an absent negative prompt, not an empty one."""
    reply = client.stub.TextToImage(text("tiny-sdxl"), timeout=120)
    expected = direct["tiny-sdxl"](prompt="a lighthouse", num_inference_steps=4, generator=generator(7)).images[0]
    same(reply.images[0], expected)
    with_empty = direct["tiny-sdxl"](
        prompt="a lighthouse", negative_prompt="", num_inference_steps=4, generator=generator(7)
    ).images[0]
    assert np.abs(decode(reply.images[0].image.data) - np.asarray(with_empty, dtype=np.int16)).mean() > 2


def test_sdxl_inputs_each_change_the_image(client):
    def mean_change(**fields) -> float:
        base = decode(client.stub.TextToImage(text("tiny-sdxl"), timeout=120).images[0].image.data)
        other = decode(client.stub.TextToImage(text("tiny-sdxl", **fields), timeout=120).images[0].image.data)
        return float(np.abs(base - other).mean())

    sizes = pb.SizeConditioning(original_height=256, original_width=256)
    assert mean_change(prompt_2="a red barn") > 3
    assert mean_change(params=pb.GenerationParams(seed=7, num_inference_steps=4, size_conditioning=sizes)) > 3


def test_sdxl_image_to_image_equals_the_direct_call(client, direct):
    from diffusers import AutoPipelineForImage2Image

    reply = client.image_to_image("a hill", gradient(), model="tiny-sdxl", seed=3, steps=4, strength=0.6)
    pipe = AutoPipelineForImage2Image.from_pipe(direct["tiny-sdxl"], dtype=direct["tiny-sdxl"].dtype)
    source = Image.open(__import__("io").BytesIO(gradient())).convert("RGB")
    expected = pipe(prompt="a hill", image=source, strength=0.6, num_inference_steps=4, generator=generator(3))
    same(reply.images[0], expected.images[0])


def test_call_turns_json_lists_into_the_tuples_sdxl_wants(client):
    arguments = {
        "prompt": "a lighthouse",
        "num_inference_steps": 4,
        "original_size": [128, 96],
        "target_size": [64, 64],
    }
    by_call = client.call("__call__", arguments, model="tiny-sdxl", seed=5)
    sizes = pb.SizeConditioning(original_height=128, original_width=96, target_height=64, target_width=64)
    typed = client.stub.TextToImage(
        text("tiny-sdxl", params=pb.GenerationParams(seed=5, num_inference_steps=4, size_conditioning=sizes)),
        timeout=120,
    )
    assert np.abs(decode(by_call.images[0].image.data) - decode(typed.images[0].image.data)).max() <= 1


def test_get_model_describes_sdxl(client, family_store):
    info = client.get_model("tiny-sdxl").model
    assert info.pipeline_class == "StableDiffusionXLPipeline"
    assert {s.name: s.task for s in info.signatures} == {
        "__call__": "text2img",
        "img2img": "img2img",
        "inpaint": "inpaint",
    }
    assert (info.default_height, info.default_width) == (64, 64) and info.dtype == "float32"
    assert info.control_inputs == 0


# --- ControlNet -------------------------------------------------------------------------------------------------


def test_controlnet_text_to_image_equals_the_direct_call_and_follows_the_control_image(client, direct):
    reply = client.stub.TextToImage(
        text("tiny-controlnet", control_images=[pb.Image(data=control_image())]), timeout=120
    )
    condition = Image.open(__import__("io").BytesIO(control_image())).convert("RGB")
    expected = direct["tiny-controlnet"](
        prompt="a lighthouse", image=condition, num_inference_steps=4, height=64, width=64, generator=generator(7)
    ).images[0]
    same(reply.images[0], expected)
    other = client.stub.TextToImage(
        text("tiny-controlnet", control_images=[pb.Image(data=control_image(200))]), timeout=120
    )
    assert np.abs(decode(other.images[0].image.data) - decode(reply.images[0].image.data)).mean() > 3


def test_controlnet_scale_and_guidance_window_reach_the_pipeline(client, direct):
    params = pb.GenerationParams(
        seed=7, num_inference_steps=4, control_scales=[0.5], control_guidance_start=0.25, control_guidance_end=0.75
    )
    reply = client.stub.TextToImage(
        text("tiny-controlnet", control_images=[pb.Image(data=control_image())], params=params), timeout=120
    )
    condition = Image.open(__import__("io").BytesIO(control_image())).convert("RGB")
    expected = direct["tiny-controlnet"](
        prompt="a lighthouse",
        image=condition,
        num_inference_steps=4,
        controlnet_conditioning_scale=0.5,
        control_guidance_start=0.25,
        control_guidance_end=0.75,
        generator=generator(7),
    ).images[0]
    same(reply.images[0], expected)
    assert client.get_model("tiny-controlnet").model.control_inputs == 1


# --- DDPM: any pipeline diffusers loads reaches SERVING ------------------------------------------------------------


def test_an_unconditional_ddpm_serves_call_and_refuses_typed_rpcs_naming_its_tasks(served, client):
    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING
    info = client.get_model("tiny-ddpm").model
    assert [(s.name, s.task) for s in info.signatures] == [("__call__", "custom")]
    assert (info.default_height, info.default_width) == (32, 32)  # pixel space: no VAE scale factor
    reply = client.call("__call__", {"num_inference_steps": 2}, model="tiny-ddpm", seed=1)
    (image,) = reply.images
    assert (image.image.width, image.image.height) == (32, 32)
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.TextToImage(text("tiny-ddpm"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "__call__ (custom)" in caught.value.details()


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (text("tiny-sd", prompt_2="x"), "prompt_2"),
        (text("tiny-sd", negative_prompt_2="x"), "negative_prompt_2"),
        (
            text("tiny-sd", params=pb.GenerationParams(size_conditioning=pb.SizeConditioning(original_height=64))),
            "params.size_conditioning",
        ),
        (
            text("tiny-sdxl", params=pb.GenerationParams(size_conditioning=pb.SizeConditioning(original_height=4))),
            "params.size_conditioning.original_height",
        ),
        (
            text("tiny-sdxl", params=pb.GenerationParams(size_conditioning=pb.SizeConditioning(crop_top=10**6))),
            "params.size_conditioning.crop_top",
        ),
        (text("tiny-sdxl", params=pb.GenerationParams(aesthetic_score=6.0)), "params.aesthetic_score"),
        (text("tiny-sd", control_images=[pb.Image(data=control_image())]), "control_images"),
        (text("tiny-sd", params=pb.GenerationParams(control_scales=[1.0])), "params.control_scales"),
        (text("tiny-controlnet"), "control_images"),  # the ControlNet needs its image
        (text("tiny-controlnet", control_images=[pb.Image(data=control_image())] * 2), "control_images"),
        (
            text(
                "tiny-controlnet",
                control_images=[pb.Image(data=control_image())],
                params=pb.GenerationParams(control_scales=[float("nan")]),
            ),
            "params.control_scales",
        ),
        (
            text(
                "tiny-controlnet",
                control_images=[pb.Image(data=control_image())],
                params=pb.GenerationParams(control_guidance_start=0.8, control_guidance_end=0.2),
            ),
            "params.control_guidance_start",
        ),
        (text("tiny-controlnet", control_images=[pb.Image(data=b"not an image")]), "control_images[0]"),
    ],
)
def test_inputs_a_model_does_not_take_are_refused_naming_the_field(served, client, request_, field):
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.TextToImage(request_, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(caught.value)
    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING


# --- dtype --------------------------------------------------------------------------------------------------------


def test_serve_in_bfloat16_on_the_cpu_reports_it(family_store):
    with (
        running_server(family_store, tags=("tiny-sd",), dtype="bfloat16") as (_, target),
        DiffusionClient(target) as client,
    ):
        info = client.get_model().model
        assert info.dtype == "bfloat16" and info.load_options["torch_dtype"] == "bfloat16"
        (image,) = client.text_to_image("a fox", seed=1, steps=2).images
        assert decode(image.image.data).shape == (64, 64, 3)


def test_compile_is_refused_on_the_cpu_with_a_clear_message(family_store):
    from service.config import ConfigError, ServerConfig
    from service.server import DiffusionServer

    with pytest.raises(ConfigError, match="--compile needs CUDA devices"):
        DiffusionServer(ServerConfig(tags=("tiny-sd",), device="cpu", compile=True), family_store)


def test_the_python_client_sends_second_prompts_sizes_and_control_images(client):
    typed = client.stub.TextToImage(
        text(
            "tiny-sdxl",
            prompt_2="in winter",
            params=pb.GenerationParams(
                seed=7, num_inference_steps=4, size_conditioning=pb.SizeConditioning(original_height=128)
            ),
        ),
        timeout=120,
    )
    by_client = client.text_to_image(
        "a lighthouse",
        model="tiny-sdxl",
        prompt_2="in winter",
        seed=7,
        steps=4,
        size_conditioning={"original_height": 128},
    )
    assert by_client.images[0].image.data == typed.images[0].image.data
    controlled = client.text_to_image(
        "a lighthouse", model="tiny-controlnet", control_images=[control_image()], seed=7, steps=4
    )
    assert controlled.images[0].seed == 7
