"""The OpenAI-compatible Images API through the official `openai` client against a live server (gRPC and HTTP in
one process): every image equal to the gRPC reply for the same request, streaming with partial images, edits
with and without a mask, and each error with its status, `param` and `Retry-After`."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import httpx2 as httpx
import numpy as np
import openai
import pytest
from helpers import decode, wait_for
from inprocess import running_server
from PIL import Image
from test_api_tasks import gradient, png

from model_store import ModelStore
from model_store.adapters import import_lora
from model_store.demo import save_demo
from model_store.tiny_families import build_tiny_instruct_pix2pix, save_tiny_lora
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def http_store(tmp_path_factory, store):
    home = ModelStore(tmp_path_factory.mktemp("openai-http"))
    save_demo(home)  # tiny-sd: text-to-image, image-to-image and inpainting
    home.save_model("tiny-pix2pix", build_tiny_instruct_pix2pix(seed=0), signatures={"__call__": {"batchable": True}})
    lora = save_tiny_lora(store.get("tiny-sd").load_pipeline("cpu"), tmp_path_factory.mktemp("lora") / "red", seed=1)
    import_lora(home, "red", lora, "tiny-sd")
    return home


@pytest.fixture(scope="module")
def served(http_store):
    limits = {"max_images": 4, "max_message_mb": 1}
    with running_server(http_store, tags=("tiny-sd", "tiny-pix2pix"), http_port=0, **limits) as (server, target):
        yield server, target


@pytest.fixture(scope="module")
def api(served):
    server, _ = served
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http.port}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(served):
    with DiffusionClient(served[1]) as client:
        yield client


def pixels(b64: str) -> np.ndarray:
    return decode(base64.b64decode(b64))


def same(b64: str, generated: pb.GeneratedImage) -> None:
    """An HTTP image equals the gRPC one within 1 level (the standard of correctness, whatever each batched with)."""
    ours, theirs = pixels(b64), decode(generated.image.data)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def transparent_right_half(width: int = 64, height: int = 64) -> bytes:
    """OpenAI's mask: opaque where the image stays, transparent (alpha 0) where it is repainted."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, width // 2 :, 3] = 0
    return png(Image.fromarray(rgba, "RGBA"))


def white_right_half(width: int = 64, height: int = 64) -> bytes:
    """The same mask as diffusers takes it: white repaints."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return png(Image.fromarray(mask, "L"))


# --- generations -----------------------------------------------------------------------------------------------


def test_generate_equals_the_grpc_text_to_image_for_each_of_n_images(api, grpc_client):
    extensions = {"seed": 7, "num_inference_steps": 4, "guidance_scale": 6.0, "negative_prompt": "fog"}
    reply = api.images.generate(
        model="tiny-sd", prompt="a lighthouse", n=2, size="64x48", response_format="b64_json", extra_body=extensions
    )
    expected = grpc_client.text_to_image(
        "a lighthouse", model="tiny-sd", seed=7, steps=4, guidance_scale=6.0, negative_prompt="fog", num_images=2,
        width=64, height=48,
    )  # fmt: skip
    assert len(reply.data) == 2 and reply.size == "64x48" and reply.output_format == "png"
    for image, generated in zip(reply.data, expected.images):
        same(image.b64_json, generated)
    assert [image.model_extra["seed"] for image in reply.data] == [7, 8]
    assert not np.array_equal(pixels(reply.data[0].b64_json), pixels(reply.data[1].b64_json))
    # usage counts images and denoising steps; OpenAI's token fields carry the steps for clients that read them
    assert reply.usage.model_extra["images"] == 2 and reply.usage.model_extra["denoising_steps"] == 8
    assert reply.usage.output_tokens == reply.usage.total_tokens == 8 and reply.usage.input_tokens == 0


def test_each_extension_reaches_the_pipeline(api, grpc_client):
    """Each extension changes the image, to what the gRPC request with the same value makes."""
    base = {"seed": 3, "num_inference_steps": 3}
    changes = [  # (the HTTP field, the gRPC client's keyword, the value)
        ("negative_prompt", "negative_prompt", "rain"),
        ("guidance_scale", "guidance_scale", 2.0),
        ("num_inference_steps", "steps", 5),
        ("seed", "seed", 4),
        ("scheduler", "scheduler", "EulerDiscreteScheduler"),
        ("loras", "adapters", [{"name": "red", "weight": 0.7}]),
    ]

    def generate(extra):
        reply = api.images.generate(model="tiny-sd", prompt="a barn", extra_body={**base, **extra})
        return reply.data[0].b64_json

    plain = pixels(generate({}))
    for field, keyword, value in changes:
        changed = generate({field: value})
        assert not np.array_equal(pixels(changed), plain), field
        grpc_value = {entry["name"]: entry["weight"] for entry in value} if field == "loras" else value
        expected = grpc_client.text_to_image("a barn", model="tiny-sd", **{"seed": 3, "steps": 3, keyword: grpc_value})
        same(changed, expected.images[0])


def test_size_auto_and_none_give_the_models_default_and_formats_follow(api):
    for size in ("auto", None):
        reply = api.images.generate(model="tiny-sd", prompt="a hill", **({"size": size} if size else {}),
                                    extra_body={"seed": 1, "num_inference_steps": 2})  # fmt: skip
        assert reply.size == "64x64"
    quick = {"seed": 1, "num_inference_steps": 2}
    for output_format, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        reply = api.images.generate(
            model="tiny-sd", prompt="a hill", output_format=output_format, output_compression=80, extra_body=quick
        )
        assert base64.b64decode(reply.data[0].b64_json).startswith(magic) and reply.output_format == output_format


def test_models_lists_the_served_tags_in_openais_shape(api, served):
    listed = api.models.list()
    assert [model.id for model in listed.data] == [m.tag for m in served[0].registry.models]
    assert all(model.object == "model" and model.created > 0 for model in listed.data)
    assert api.models.retrieve("tiny-sd").id == served[0].registry.models[0].tag
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")


# --- edits ---------------------------------------------------------------------------------------------------


def test_edit_without_a_mask_is_image_to_image_with_strength(api, grpc_client):
    reply = api.images.edit(
        model="tiny-sd", image=("in.png", gradient(), "image/png"), prompt="a sunny hill",
        extra_body={"seed": 3, "num_inference_steps": 4, "strength": 0.5},
    )  # fmt: skip
    expected = grpc_client.image_to_image("a sunny hill", gradient(), model="tiny-sd", seed=3, steps=4, strength=0.5)
    same(reply.data[0].b64_json, expected.images[0])
    weaker = api.images.edit(
        model="tiny-sd", image=("in.png", gradient(), "image/png"), prompt="a sunny hill",
        extra_body={"seed": 3, "num_inference_steps": 4, "strength": 0.25},
    )  # fmt: skip
    assert not np.array_equal(pixels(weaker.data[0].b64_json), pixels(reply.data[0].b64_json))


def test_edit_with_a_mask_inpaints_where_the_mask_is_transparent(api, grpc_client):
    reply = api.images.edit(
        model="tiny-sd", image=("in.png", gradient(), "image/png"), mask=("mask.png", transparent_right_half()),
        prompt="a red door", n=2, extra_body={"seed": 5, "num_inference_steps": 4},
    )  # fmt: skip
    expected = grpc_client.inpaint(
        "a red door", gradient(), white_right_half(), model="tiny-sd", seed=5, steps=4, num_images=2
    )
    for image, generated in zip(reply.data, expected.images):
        same(image.b64_json, generated)
    inverse = png(Image.fromarray(255 - np.asarray(Image.open(io.BytesIO(white_right_half()))), "L"))
    flipped = grpc_client.inpaint("a red door", gradient(), inverse, model="tiny-sd", seed=5, steps=4)
    assert np.abs(pixels(reply.data[0].b64_json).astype(int) - decode(flipped.images[0].image.data)).mean() > 1


def test_edit_goes_to_the_models_edit_task_where_it_serves_one(api, grpc_client):
    source = gradient()
    reply = api.images.edit(
        model="tiny-pix2pix", image=[("in.png", source, "image/png")], prompt="make it snow",
        extra_body={"seed": 3, "num_inference_steps": 4, "negative_prompt": "rain"},
    )  # fmt: skip
    expected = grpc_client.edit("make it snow", [source], model="tiny-pix2pix", seed=3, steps=4, negative_prompt="rain")
    same(reply.data[0].b64_json, expected.images[0])


# --- streaming -----------------------------------------------------------------------------------------------


def test_a_stream_sends_partial_images_then_the_completed_one(api, grpc_client):
    stream = api.images.generate(
        model="tiny-sd", prompt="a lighthouse", stream=True, partial_images=2, size="64x64",
        extra_body={"seed": 11, "num_inference_steps": 6},
    )  # fmt: skip
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert all(pixels(event.b64_json).shape == (64, 64, 3) for event in events)
    assert not np.array_equal(pixels(events[0].b64_json), pixels(events[1].b64_json))  # denoising went on
    expected = grpc_client.text_to_image("a lighthouse", model="tiny-sd", seed=11, steps=6, width=64, height=64)
    same(events[-1].b64_json, expected.images[0])
    assert events[-1].usage.model_extra["denoising_steps"] == 6


def test_an_edit_streams_the_same_way(api, grpc_client):
    stream = api.images.edit(
        model="tiny-sd", image=("in.png", gradient(), "image/png"), prompt="a sunny hill", stream=True,
        partial_images=1, extra_body={"seed": 2, "num_inference_steps": 4, "strength": 1.0},
    )  # fmt: skip
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    expected = grpc_client.image_to_image("a sunny hill", gradient(), model="tiny-sd", seed=2, steps=4, strength=1.0)
    same(events[-1].b64_json, expected.images[0])


def test_a_dropped_stream_frees_its_slot(served):
    """The client reads the first partial image and disconnects: the request ends CANCELLED, its image is never
    finished, and the in-flight gauge returns to zero."""
    server, _ = served
    cancelled_before = server.stats.outcomes["cancelled"]
    body = {"model": "tiny-sd", "prompt": "a long one", "stream": True, "partial_images": 1,
            "num_inference_steps": 150, "seed": 1}  # fmt: skip
    url = f"http://127.0.0.1:{server.http.port}/v1/images/generations"
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == "event: image_generation.partial_image"
    wait_for(lambda: server.telemetry.in_flight == 0 and server.metrics.in_flight._value.get() == 0, 30, "in flight 0")
    tag = server.registry.models[0].tag
    cancelled = server.metrics.requests.labels(tag, "POST /v1/images/generations", "CANCELLED")
    wait_for(lambda: cancelled._value.get() >= 1, 30, "the CANCELLED count")
    # the step engine let the item go, cancelled, before its last step
    wait_for(lambda: server.stats.outcomes["cancelled"] > cancelled_before, 30, "the item to leave cancelled")
    wait_for(lambda: sum(g._value.get() for g in active_gauges(server)) == 0, 30, "no item in the step engine")


def active_gauges(server):
    return [server.metrics.active_items.labels(worker) for worker in server.stats.workers]


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "big"}, "size"),
        ({"size": "65x64"}, "size"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"scheduler": "NoSuchScheduler"}, "scheduler"),
        ({"response_format": "url"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"partial_images": 4, "stream": True}, "partial_images"),
        ({"loras": [{"name": "nope", "weight": 1.0}]}, "loras[0].name"),
        ({"background": "transparent"}, "background"),
        ({"true_cfg_scale": 2.0}, "true_cfg_scale"),  # SD has no true CFG: the shared validation says so
        ({"num_inference_step": 4}, "num_inference_step"),  # a typo is named, not ignored
        ({"prompt": ""}, "prompt"),
        ({"model": None}, "model"),  # two models are served: say which
    ],
)
def test_bad_input_is_a_400_naming_the_field(api, fields, param):
    request = {"model": "tiny-sd", "prompt": "x", **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(**{k: v for k, v in request.items() if k in ("model", "prompt")},
                            extra_body={k: v for k, v in request.items() if k not in ("model", "prompt")})  # fmt: skip
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert error.type == "invalid_request_error" and error.code and param.split("[")[0] in error.message


def test_bad_edits_are_400s_naming_the_field(api):
    cases = [
        ({"model": "tiny-sd", "mask": ("mask.png", white_right_half())}, "mask"),  # no alpha channel
        ({"model": "tiny-pix2pix", "mask": ("mask.png", transparent_right_half())}, "mask"),  # does not inpaint
        ({"model": "tiny-sd", "image": [("a.png", gradient()), ("b.png", gradient())]}, "image"),
        ({"model": "tiny-pix2pix", "extra_body": {"strength": 0.5}}, "strength"),
        ({"model": "tiny-sd", "image": ("a.png", b"not an image")}, "image"),
    ]
    for fields, param in cases:
        request = {"image": ("in.png", gradient(), "image/png"), "prompt": "x", **fields}
        with pytest.raises(openai.BadRequestError) as caught:
            api.images.edit(**request)
        assert caught.value.param == param, (fields, caught.value.body)


def test_an_unknown_model_is_a_404(api):
    with pytest.raises(openai.NotFoundError) as caught:
        api.images.generate(model="no-such-model", prompt="x")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_a_body_that_is_not_json_is_a_400_in_openais_shape(served):
    url = f"http://127.0.0.1:{served[0].http.port}/v1/images/generations"
    for data, content_type in ((b"{not json", "application/json"), (b"[]", "application/json"), (b"x", "text/plain")):
        request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400
        error = json.loads(caught.value.read())["error"]
        assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{served[0].http.port}/v1/nothing", timeout=30)
    assert caught.value.code == 404 and "error" in json.loads(caught.value.read())
    too_large = json.dumps({"prompt": "x" * (2 << 20)}).encode()  # over --max-message-mb 1
    request = urllib.request.Request(url, data=too_large, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413 and json.loads(caught.value.read())["error"]["code"] == "request_too_large"


def test_errors_the_server_refuses_with_carry_retry_after(store):
    """401 for a missing or wrong token (on every endpoint), 429 for a full queue and 503 while draining, each with
    the same request id header as any reply; a live call goes on through the drain."""
    with running_server(store, http_port=0, auth_token=TOKEN, max_queue=2, grace_seconds=30) as (server, _):
        base = f"http://127.0.0.1:{server.http.port}/v1"
        with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.images.generate(prompt="x")
            assert caught.value.code == "unauthenticated" and caught.value.type == "authentication_error"
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        for path in ("/images/generations", "/models"):  # no token at all
            with pytest.raises(urllib.error.HTTPError) as no_token:
                data = b"{}" if path != "/models" else None
                urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=30)
            assert (
                no_token.value.code == 401 and json.loads(no_token.value.read())["error"]["code"] == "unauthenticated"
            )
        with openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0) as api:
            with pytest.raises(openai.RateLimitError) as caught:
                api.images.generate(prompt="x", n=3, extra_body={"num_inference_steps": 2})
            assert caught.value.code == "queue_full" and caught.value.response.headers["Retry-After"] == "1"
            assert caught.value.response.headers["x-request-id"]
            assert len(api.images.generate(prompt="x", extra_body={"seed": 1, "num_inference_steps": 2}).data) == 1

            # A drain: a long call in flight finishes; a new call on a kept-alive connection gets 503.
            long_done: dict[str, object] = {}
            streaming = threading.Event()

            def long_call() -> None:
                events = api.images.generate(prompt="x", stream=True, partial_images=1,
                                             extra_body={"seed": 1, "num_inference_steps": 60})  # fmt: skip
                for event in events:
                    streaming.set()
                    long_done["type"] = event.type

            prober = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0)
            assert prober.models.list().data  # its connection stays open (keep-alive) through the drain
            caller = threading.Thread(target=long_call)
            caller.start()
            assert streaming.wait(60)
            stopping = server.loop_thread.run_async(server.stop(grace=30, drain=0))
            wait_for(lambda: not server.http.accepting, 30, "the HTTP listener to close")
            with pytest.raises(openai.InternalServerError) as caught:
                prober.images.generate(prompt="x", extra_body={"num_inference_steps": 2})
            assert caught.value.status_code == 503 and caught.value.response.headers["Retry-After"] == "1"
            assert caught.value.code == "draining"
            prober.close()
            caller.join(60)
            stopping.result(60)
            assert long_done["type"] == "image_generation.completed"
