"""ImageToImage, Inpaint, schedulers, output formats and validation through a real in-process server."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from helpers import bad_request_fields, decode, error_details, health_status, reason_of
from inprocess import running_server
from PIL import Image

from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb
from service.imaging import read_text_chunks


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 64) -> bytes:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    rgb = np.stack(
        [np.tile(x, (height, 1)), np.tile(y[:, None], (1, width)), np.full((height, width), 128, np.uint8)], -1
    )
    return png(Image.fromarray(rgb, "RGB"))


def half_mask(width: int = 64, height: int = 64) -> bytes:
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return png(Image.fromarray(mask, "L"))


def test_image_to_image_returns_an_image_of_the_input_size(client):
    reply = client.image_to_image("a sunny hill", gradient(), seed=3, steps=4, strength=0.5)
    (image,) = reply.images
    assert (image.image.width, image.image.height) == (64, 64) and image.seed == 3
    again = client.image_to_image("a sunny hill", gradient(), seed=3, steps=4, strength=0.5)
    assert again.images[0].image.data == image.image.data
    weaker = client.image_to_image("a sunny hill", gradient(), seed=3, steps=4, strength=0.25)
    assert weaker.images[0].image.data != image.image.data


def test_image_to_image_output_size_follows_requested_size(client):
    reply = client.image_to_image("x", gradient(80, 48), seed=1, steps=2, strength=0.5)
    assert (reply.images[0].image.width, reply.images[0].image.height) == (80, 48)
    resized = client.image_to_image("x", gradient(80, 48), seed=1, steps=2, strength=0.5, width=64, height=64)
    assert (resized.images[0].image.width, resized.images[0].image.height) == (64, 64)


def test_inpaint_keeps_the_unmasked_half_closer_to_the_input(client):
    source = decode(gradient())
    reply = client.inpaint("a red door", gradient(), half_mask(), seed=5, steps=4)
    out = decode(reply.images[0].image.data)
    assert out.shape == (64, 64, 3)
    kept = np.abs(out[:, :28] - source[:, :28]).mean()
    repainted = np.abs(out[:, 36:] - source[:, 36:]).mean()
    assert kept < repainted


def test_derived_tasks_share_the_weights_of_the_base_pipeline(store):
    runner = store.get("tiny-sd").to_runner("cpu")
    base = runner.pipeline
    for task in ("img2img", "inpaint"):
        derived = runner.signatures[task].pipeline
        assert derived is not base
        for name in ("unet", "vae", "text_encoder"):
            assert getattr(derived, name) is getattr(base, name)
            first = next(getattr(derived, name).parameters())
            assert first.data_ptr() == next(getattr(base, name).parameters()).data_ptr()


def test_png_text_chunks_describe_the_request(client):
    reply = client.text_to_image("a quiet lake", negative_prompt="people", seed=11, steps=3, guidance_scale=5.0)
    chunks = read_text_chunks(reply.images[0].image.data)
    assert chunks["model"] == reply.model
    assert chunks["prompt"] == "a quiet lake" and chunks["negative_prompt"] == "people"
    assert chunks["seed"] == "11" and chunks["num_inference_steps"] == "3"
    assert float(chunks["guidance_scale"]) == 5.0
    assert chunks["scheduler"] == "DDIMScheduler" and (chunks["width"], chunks["height"]) == ("64", "64")


def test_jpeg_and_webp_outputs(client):
    jpeg = client.text_to_image("x", seed=1, steps=2, output_format="jpeg", quality=80).images[0].image
    webp = client.text_to_image("x", seed=1, steps=2, output_format="webp").images[0].image
    assert jpeg.mime_type == "image/jpeg" and jpeg.data[:2] == b"\xff\xd8"
    assert webp.mime_type == "image/webp" and webp.data[8:12] == b"WEBP"


def test_scheduler_changes_the_image_and_reproduces_it(client):
    info = client.get_model().model
    other = next(name for name in info.schedulers if name not in ("DDIMScheduler",) and "Euler" in name)
    ddim = client.text_to_image("a castle", seed=9, steps=4).images[0].image.data
    first = client.text_to_image("a castle", seed=9, steps=4, scheduler=other).images[0].image.data
    second = client.text_to_image("a castle", seed=9, steps=4, scheduler=other).images[0].image.data
    assert first == second
    assert first != ddim
    assert client.text_to_image("a castle", seed=9, steps=4).images[0].image.data == ddim  # default restored


def test_long_prompt_gets_a_truncation_warning(client):
    reply = client.text_to_image(" ".join(["mountain"] * 120), seed=1, steps=2)
    assert any("prompt is" in w and "77" in w for w in reply.warnings)
    assert not client.text_to_image("short", seed=1, steps=2).warnings


def test_large_2048_input_works_end_to_end(client):
    noise = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    data = png(Image.fromarray(noise, "RGB"))
    assert len(data) > 8 << 20  # well past gRPC's default 4 MiB limit: the 64 MiB default on both ends applies
    reply = client.image_to_image("x", data, seed=1, steps=4, strength=0.25, width=64, height=64)
    assert (reply.images[0].image.width, reply.images[0].image.height) == (64, 64)


def test_an_undecodable_image_is_named_without_a_python_repr(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.image_to_image("x", b"not an image", steps=2)
    assert "not a PNG, JPEG or WebP image" in caught.value.details()
    assert "0x" not in caught.value.details() and "<" not in caught.value.details()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.image_to_image("x", b"", steps=2), "image"),
        (lambda c: c.image_to_image("x", b"not an image", steps=2), "image"),
        (lambda c: c.image_to_image("x", gradient(), steps=2, strength=1.5), "strength"),
        (lambda c: c.image_to_image("x", gradient(), steps=2, strength=float("nan")), "strength"),
        (lambda c: c.image_to_image("x", gradient(), steps=4, strength=0.2), "strength"),
        (lambda c: c.image_to_image("x", gradient(), steps=1), "params.num_inference_steps"),
        (lambda c: c.inpaint("x", gradient(), half_mask(32, 32), steps=2), "mask_image"),
        (lambda c: c.inpaint("x", gradient(), b"", steps=2), "mask_image"),
        (lambda c: c.text_to_image("x", steps=2, quality=0, output_format="jpeg"), "params.quality"),
        (lambda c: c.text_to_image("x", steps=2, eta=float("inf")), "params.eta"),
    ],
)
def test_bad_inputs_get_invalid_argument_naming_the_field(served, client, call, field):
    with pytest.raises(grpc.RpcError) as caught:
        call(client)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(caught.value)
    assert health_status(served[1]) == health_pb2.HealthCheckResponse.SERVING
    assert client.text_to_image("still fine", seed=1, steps=2).images


def test_decompression_bomb_is_refused(store):
    with running_server(store, max_input_pixels=100 * 100) as (_, target), DiffusionClient(target) as small:
        with pytest.raises(grpc.RpcError) as caught:
            small.image_to_image("x", gradient(128, 128), steps=2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pixels" in caught.value.details()


def test_list_and_get_model_describe_signatures_and_schedulers(client):
    listed = client.list_models().models
    got = client.get_model(listed[0].tag).model
    assert got == listed[0]
    tasks = {s.name: s.task for s in got.signatures}
    assert tasks == {"__call__": "text2img", "img2img": "img2img", "inpaint": "inpaint"}
    assert "EulerDiscreteScheduler" in got.schedulers
    with pytest.raises(grpc.RpcError) as caught:
        client.get_model("nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = error_details(caught.value)
    assert (info.reason, dict(info.metadata)) == ("MODEL_NOT_FOUND", {"model": "nope"})


def test_a_request_with_only_a_prompt_uses_the_models_defaults(client):
    reply = client.stub.TextToImage(pb.TextToImageRequest(prompt="a hill"), timeout=120)
    assert reply.images[0].image.width == 64


@pytest.mark.parametrize("prompt", ["", "   "])
def test_text_to_image_without_a_prompt_is_refused_naming_it(client, prompt):
    """An empty request would otherwise run a 50-step unconditional image nobody asked for."""
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.TextToImage(pb.TextToImageRequest(prompt=prompt), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["prompt"]
    assert reason_of(caught.value) == "INVALID_ARGUMENT"


def test_a_task_the_model_does_not_serve_names_the_model_and_task(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.edit("make it red", [png(Image.new("RGB", (64, 64)))])
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    info, retry = error_details(caught.value)
    assert (info.reason, info.metadata["task"], retry) == ("TASK_NOT_SERVED", "edit", None)
    assert info.metadata["model"] == client.get_model("").model.tag
