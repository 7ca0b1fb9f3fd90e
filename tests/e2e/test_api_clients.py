"""Every RPC against a real server process: grpcurl through reflection, the Node.js client, the generate CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, cli, decode, server_process
from PIL import Image

pytestmark = pytest.mark.e2e
GRPCURL = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")
SERVICE = "diffusion.v1.DiffusionService"


def png_bytes(width: int = 64, height: int = 64, mask: bool = False) -> bytes:
    array = np.zeros((height, width), np.uint8) if mask else np.full((height, width, 3), 120, np.uint8)
    if mask:
        array[:, width // 2 :] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def target(store_home):
    with server_process(store_home) as address:
        yield address


def grpcurl(target: str, method: str, data: dict) -> list[dict]:
    result = subprocess.run(
        [GRPCURL, "-plaintext", "-max-msg-sz", str(64 << 20), "-d", json.dumps(data), target, f"{SERVICE}/{method}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(chunk) for chunk in _json_objects(result.stdout)]


def _json_objects(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message; split them."""
    decoder, index, found = json.JSONDecoder(), 0, []
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        _, end = decoder.raw_decode(text, index)
        found.append(text[index:end])
        index = end
    return found


def test_grpcurl_image_to_image(target):
    (reply,) = grpcurl(
        target,
        "ImageToImage",
        {
            "prompt": "x",
            "image": {"data": b64(png_bytes())},
            "strength": 0.5,
            "params": {"seed": "4", "numInferenceSteps": 4},
        },
    )
    assert reply["images"][0]["seed"] == "4"
    assert decode(base64.b64decode(reply["images"][0]["image"]["data"])).shape == (64, 64, 3)


def test_grpcurl_inpaint(target):
    (reply,) = grpcurl(
        target,
        "Inpaint",
        {
            "prompt": "x",
            "image": {"data": b64(png_bytes())},
            "maskImage": {"data": b64(png_bytes(mask=True))},
            "params": {"seed": "4", "numInferenceSteps": 2},
        },
    )
    assert reply["images"][0]["image"]["width"] == 64


def test_grpcurl_call(target):
    (reply,) = grpcurl(
        target, "Call", {"signature": "__call__", "seed": "8", "arguments": {"prompt": "x", "num_inference_steps": 2}}
    )
    assert reply["images"][0]["seed"] == "8"


def test_grpcurl_stream(target):
    events = grpcurl(
        target, "Stream", {"textToImage": {"prompt": "x", "params": {"seed": "1", "numInferenceSteps": 3}}}
    )
    assert [e["progress"]["step"] for e in events[:-1]] == [1, 2, 3]
    assert "text_to_image" in events[-1]  # grpcurl prints proto field names


def test_grpcurl_list_and_get_model(target):
    (listed,) = grpcurl(target, "ListModels", {})
    tag = listed["models"][0]["tag"]
    (got,) = grpcurl(target, "GetModel", {"model": tag})
    assert got["model"]["tag"] == tag and got["model"]["default_width"] == 64
    assert {s["name"] for s in got["model"]["signatures"]} == {"__call__", "img2img", "inpaint"}


@pytest.mark.skipif(
    shutil.which("node") is None or not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="node or node_modules (make install) missing",
)
def test_node_client_calls_text_to_image_and_stream(target):
    result = subprocess.run(
        ["node", "tests/node/client.js", target], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["seed"] == "77" and (reply["width"], reply["height"]) == (64, 64) and reply["png"] == "PNG"
    assert reply["model"].startswith("tiny-sd:")
    assert reply["steps"] == [1, 2, 3]
    assert reply["streamedData"] == reply["data"]  # Stream's result equals the unary result for the seed
    assert (reply["callSeed"], reply["callWidth"]) == ("77", 64)  # Call, with its Struct built in JavaScript


def test_generate_cli_covers_the_three_tasks_and_progress(target, tmp_path):
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    source.write_bytes(png_bytes())
    mask.write_bytes(png_bytes(mask=True))
    runs = {
        "t2i.webp": ["--format", "webp", "--num-images", "2", "--scheduler", "EulerDiscreteScheduler"],
        "i2i.png": ["--image", str(source), "--strength", "0.5", "--progress"],
        "inpaint.png": ["--image", str(source), "--mask", str(mask)],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        result = subprocess.run(
            cli("generate", "a hut", "--target", target, "--seed", "3", "--steps", "4", "-o", str(out), *extra),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "t2i-1.webp").read_bytes()[8:12] == b"WEBP"
    assert (tmp_path / "t2i-2.webp").is_file()
    assert decode((tmp_path / "i2i.png").read_bytes()).shape == (64, 64, 3)
    assert decode((tmp_path / "inpaint.png").read_bytes()).shape == (64, 64, 3)


def test_generate_cli_reports_bad_input_clearly(target):
    result = subprocess.run(
        cli("generate", "x", "--target", target, "--height", "65"), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "params.height" in result.stderr


@pytest.mark.parametrize(
    ("lora", "says"),
    [("unknown-style:0.5", "params.adapters[0].name"), ("style:strong", "the weight must be a number")],
)
def test_generate_cli_sends_loras_by_name_and_weight(target, lora, says):
    result = subprocess.run(
        cli("generate", "x", "--target", target, "--steps", "2", "--lora", lora),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert says in result.stderr
