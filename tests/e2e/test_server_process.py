"""End to end: a real `diffusers-grpc serve` process, called by grpcurl (reflection) and by the CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, cli, decode, server_process

pytestmark = pytest.mark.e2e
GRPCURL = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")


@pytest.fixture(scope="module")
def target(store_home):
    with server_process(store_home) as address:
        yield address


def grpcurl(*args: str, data: dict | None = None) -> subprocess.CompletedProcess[str]:
    command = [GRPCURL, "-plaintext", "-max-msg-sz", str(64 << 20)]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def test_grpcurl_lists_the_service_through_reflection(target):
    result = grpcurl(target, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "diffusion.v1.DiffusionService" in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_text_to_image_returns_the_image_and_its_seed(target):
    result = grpcurl(
        target,
        "diffusion.v1.DiffusionService/TextToImage",
        data={"prompt": "a red fox", "params": {"seed": "31", "numInferenceSteps": 4}},
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    (image,) = reply["images"]
    assert image["seed"] == "31"  # uint64 is a JSON string
    assert reply["model"].startswith("tiny-sd:")
    assert decode(base64.b64decode(image["image"]["data"])).shape == (64, 64, 3)


def test_grpcurl_bad_height_gets_invalid_argument(target):
    result = grpcurl(
        target, "diffusion.v1.DiffusionService/TextToImage", data={"prompt": "x", "params": {"height": 100}}
    )
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "params.height" in result.stderr


def test_cli_generate_writes_a_png(target, tmp_path):
    out = tmp_path / "fox.png"
    result = subprocess.run(
        cli("generate", "a fox", "--target", target, "--seed", "5", "--steps", "4", "-o", str(out)),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "seed 5" in result.stdout
    assert decode(out.read_bytes()).shape == (64, 64, 3)


def test_cli_health_exit_codes(target):
    assert subprocess.run(cli("health", "--target", target), capture_output=True, timeout=60).returncode == 0
    unknown = subprocess.run(cli("health", "--target", target, "--service", "nope"), capture_output=True, timeout=60)
    assert unknown.returncode == 1
    closed = subprocess.run(cli("health", "--target", "127.0.0.1:1", "--timeout", "1"), capture_output=True, timeout=60)
    assert closed.returncode == 2


def test_demo_script_writes_a_64x64_png(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--output", str(out)],
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert decode(out.read_bytes()).shape == (64, 64, 3)
    assert "done" in result.stdout
