"""Load options stored at import and applied at serve time, task overrides, class resolution, video outputs."""

from __future__ import annotations

import base64
import io
import os
import subprocess

import numpy as np
import pytest
import yaml
from helpers import ROOT, cli
from PIL import Image

from model_store import ModelStore, StoreError
from model_store.options import parse_option


@pytest.fixture(scope="module")
def pipeline():
    from model_store.demo import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def test_stored_options_apply_and_the_operators_win(tmp_path, pipeline):
    store = ModelStore(tmp_path)
    model = store.save_model(
        "m", pipeline, options={"scheduler": "EulerDiscreteScheduler", "attention_slicing": True, "cpu_offload": "none"}
    )
    stored = yaml.safe_load((model.path / "model.yaml").read_text())["options"]
    assert stored == {"scheduler": "EulerDiscreteScheduler", "attention_slicing": True, "cpu_offload": "none"}
    effective = model.effective_options()
    assert effective.scheduler == "EulerDiscreteScheduler" and effective.attention_slicing is True
    assert type(model.load_pipeline("cpu").scheduler).__name__ == "EulerDiscreteScheduler"
    overridden = model.with_options(scheduler="DDIMScheduler", attention_slicing=False).effective_options()
    assert overridden.scheduler == "DDIMScheduler" and overridden.attention_slicing is False
    assert model.with_options(torch_dtype="bfloat16").effective_options().shown()["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"no_such_option": 1}, "not a stored option: no_such_option"),
        ({"trust_remote_code": True}, "not a stored option: trust_remote_code"),  # trust is never stored
        ({"torch_dtype": "float8"}, "torch_dtype must be one of"),
        ({"cpu_offload": "always"}, "cpu_offload must be one of none, model, sequential"),
        ({"scheduler": "NoSuchScheduler"}, "not a diffusers scheduler class"),
    ],
)
def test_bad_stored_options_fail_the_import_saying_why(tmp_path, pipeline, options, message):
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match=message):
        store.save_model("m", pipeline, options=options)
    assert store.list_models() == []


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("torch_dtype=float16", ("torch_dtype", "float16")),
        ("vae_tiling=true", ("vae_tiling", True)),
        ("attention_slicing=off", ("attention_slicing", False)),
        ("cpu_offload=sequential", ("cpu_offload", "sequential")),
        ("variant=fp16", ("variant", "fp16")),
    ],
)
def test_option_flags_parse(text, parsed):
    assert parse_option(text) == parsed


@pytest.mark.parametrize("text", ["vae_tiling=maybe", "torch_dtype", "custom_pipeline=/tmp/x.py", "=1"])
def test_bad_option_flags_are_refused(text):
    with pytest.raises(StoreError):
        parse_option(text)


def test_task_override_and_an_unresolvable_class(tmp_path, pipeline):
    store = ModelStore(tmp_path)
    model = store.save_model("m", pipeline, signatures={"__call__": {}}, tasks={"__call__": "custom"})
    assert model.signatures["__call__"].task == "custom"
    folder = tmp_path / "src"
    pipeline.save_pretrained(folder)
    with pytest.raises(StoreError, match="NoSuchPipeline"):
        store.import_model("x", folder, pipeline_class="NoSuchPipeline")
    with pytest.raises(StoreError, match="undeclared"):
        store.import_model("x", folder, tasks={"img2img": "img2img"})
    assert [m.name for m in store.list_models()] == ["m"]


def test_cli_import_stores_options_and_tasks(tmp_path, pipeline):
    folder = tmp_path / "src"
    pipeline.save_pretrained(folder)
    env = {**os.environ, "DIFFUSERS_GRPC_HOME": str(tmp_path / "home")}

    def run(*args):
        return subprocess.run(cli("models", *args), env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)

    done = run("import", "m", str(folder), "--option", "torch_dtype=float16", "--task", "__call__=text2img")
    assert done.returncode == 0, done.stderr
    shown = run("get", "m")
    assert "option:    torch_dtype=float16" in shown.stdout and "task text2img" in shown.stdout
    refused = run("import", "n", str(folder), "--option", "vae_tiling=perhaps")
    assert refused.returncode == 1 and "expected true or false" in refused.stderr


def test_video_frames_come_back_as_images_in_order_and_as_animated_webp():
    from batching import CallOutput
    from service import convert

    frames = [Image.new("RGB", (16, 8), (i * 40, 0, 0)) for i in range(3)]
    array = np.stack([np.asarray(f, dtype=np.float32) / 255 for f in frames])[None]  # (batch, frames, H, W, C)

    class Job:
        served = type("Served", (), {"tag": "video:v1"})()
        seed, mime_type, animated_webp = 3, "image/png", True

        @staticmethod
        def describe(seed):
            return {}

    for value in ([frames], array):
        reply = convert.call_response(Job(), CallOutput({"frames": value, "fps": 8}))  # type: ignore[arg-type]
        reds = [np.asarray(Image.open(io.BytesIO(g.image.data)))[0, 0, 0] for g in reply.images]
        assert reds == [0, 40, 80]
        (webp,) = reply.outputs["frames_webp"]
        with Image.open(io.BytesIO(base64.b64decode(webp))) as animation:
            assert animation.format == "WEBP" and animation.n_frames == 3
        assert reply.outputs["fps"] == 8


def test_arrays_that_are_not_images_come_back_as_lists_never_as_text():
    from service.convert import jsonable

    assert jsonable(np.arange(6).reshape(2, 3)) == [[0, 1, 2], [3, 4, 5]]
    assert jsonable(np.zeros((300, 300))) == {
        "shape": [300, 300],
        "dtype": "float64",
        "omitted": "larger than the listing limit",
    }
    assert jsonable(object()) == {"type": "object"}
