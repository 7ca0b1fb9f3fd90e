"""The light client distribution, `diffusers-grpc-client`: built from this tree, installed into a fresh venv
(grpcio, protobuf and grpcio-status only: no torch), and calling a live server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from inprocess import running_server

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import build_client  # noqa: E402  (a script, not a package)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("light-client")
    wheel = build_client.build(folder / "dist")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=600)
    return python


def test_the_light_client_installs_without_torch_and_calls_a_live_server(client_venv, store):
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        from service.client import DiffusionClient

        with DiffusionClient(sys.argv[1]) as client:
            reply = client.text_to_image("a fox", seed=5, steps=2)
            info = client.get_model().model
        image = reply.images[0]
        print(json.dumps({
            "seed": image.seed, "size": [image.image.width, image.image.height], "model": reply.model,
            "engine": info.signatures[0].engine,
            "heavy": [name for name in ("torch", "diffusers", "peft", "s3fs") if importlib.util.find_spec(name)],
        }))
        """
    )
    with running_server(store) as (_, target):
        result = subprocess.run(
            [str(client_venv), "-c", script, target], capture_output=True, text=True, timeout=120, cwd="/"
        )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["heavy"] == []  # none of the server's dependencies came with it
    assert reply["seed"] == 5 and reply["size"] == [64, 64] and reply["model"].startswith("tiny-sd:")
    assert reply["engine"] in ("step", "request")
