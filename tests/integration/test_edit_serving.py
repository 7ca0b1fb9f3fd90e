"""Typed `Edit` of FLUX.1 Kontext through a real in-process server, on the step engine: each reply equal to the
direct call, concurrent edits with different references, prompts, steps and true CFG sharing calls, and the
reference image visibly steering the result."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import decode
from inprocess import running_server
from PIL import Image
from test_api_tasks import png
from test_dit_serving import same

from model_store import ModelStore
from model_store.tiny_dit import build_tiny_flux_kontext
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

SEQ = 16  # max_sequence_length: T5 pads every prompt to it


@pytest.fixture(scope="module")
def edit_store(tmp_path_factory):
    home = ModelStore(tmp_path_factory.mktemp("edit-serving"))
    home.save_model("tiny-kontext", build_tiny_flux_kontext(seed=0), signatures={"__call__": {"batchable": True}})
    return home


@pytest.fixture(scope="module")
def client(edit_store):
    with (
        running_server(edit_store, tags=("tiny-kontext",), max_batch_size=8) as (_, target),
        DiffusionClient(target) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def kontext(edit_store):
    return edit_store.get("tiny-kontext").load_pipeline("cpu")


def reference(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    """A plain picture: a random one would average away in a tiny random VAE; plain colours do not."""
    return png(Image.new("RGB", size, color))


def direct(kontext, prompt: str, image: bytes, seed: int, steps: int, **kwargs) -> Image.Image:
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    return kontext(
        prompt=prompt, image=pil, num_inference_steps=steps, max_sequence_length=SEQ,
        generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
    ).images[0]  # fmt: skip


def test_kontext_serves_edit_on_the_step_engine(client):
    info = client.stub.GetModel(pb.GetModelRequest(model="tiny-kontext"), timeout=30).model
    assert [(s.task, s.engine) for s in info.signatures] == [("edit", "step")]


EDITS = [
    ("make it red", reference((255, 255, 255)), {"seed": 1, "steps": 2}),
    ("make it blue", reference((0, 0, 0)), {"seed": 2, "steps": 3, "guidance_scale": 5.0}),
    ("add a hat", reference((255, 255, 255)), {"seed": 3, "steps": 2, "true_cfg_scale": 2.0}),
    ("make it snow", reference((0, 128, 255), (48, 64)), {"seed": 4, "steps": 2}),  # another aspect: its own set
]


def test_concurrent_edits_each_equal_their_direct_call(client, kontext):
    def send(prompt: str, image: bytes, fields: dict) -> pb.EditResponse:
        negative = "blurry" if "true_cfg_scale" in fields else ""
        return client.edit(prompt, [image], model="tiny-kontext", negative_prompt=negative,
                           max_sequence_length=SEQ, **fields)  # fmt: skip

    with ThreadPoolExecutor(len(EDITS)) as pool:
        replies = list(pool.map(lambda edit: send(*edit), EDITS))
    for (prompt, image, fields), reply in zip(EDITS, replies):
        extra = {k: v for k, v in fields.items() if k not in ("seed", "steps")}
        if "true_cfg_scale" in fields:
            extra["negative_prompt"] = "blurry"
        expected = direct(kontext, prompt, image, fields["seed"], fields["steps"], **extra)
        assert (reply.images[0].image.width, reply.images[0].image.height) == expected.size
        same(reply.images[0], expected)


def test_the_reference_image_visibly_steers_the_edit(client):
    white, black = (
        client.edit("make it red", [reference(color)], model="tiny-kontext", seed=5, steps=2, max_sequence_length=SEQ)
        for color in ((255, 255, 255), (0, 0, 0))
    )
    assert np.abs(decode(white.images[0].image.data) - decode(black.images[0].image.data)).max() >= 8
