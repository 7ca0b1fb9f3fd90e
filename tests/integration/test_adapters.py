"""LoRA adapters and textual-inversion embeddings: stored under their own tags, served per request, each image
equal to the direct diffusers call with the same adapters (load_lora_weights + set_adapters), on both engines and
under mixed concurrent traffic."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, bad_request_fields, cli, decode, wait_for
from inprocess import Gate, running_server

from model_store import ModelStore, StoreError
from model_store.adapters import import_embedding, import_lora
from model_store.archive import export_model, import_archive
from model_store.demo import build_tiny_pipeline
from model_store.tiny_families import build_tiny_sdxl, save_tiny_embedding, save_tiny_lora
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

TOKEN = "<tiny-style>"
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the direct calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter-files")
    demo = build_tiny_pipeline(seed=0)
    return {
        "red": save_tiny_lora(demo, folder / "red", seed=1),
        "blue": save_tiny_lora(demo, folder / "blue", seed=2),
        "late": save_tiny_lora(demo, folder / "late", seed=3),
        "xl": save_tiny_lora(build_tiny_sdxl(seed=0), folder / "xl", seed=4),
        "style": save_tiny_embedding(demo, folder / "style.safetensors", token=TOKEN, scale=6.0),
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory, store, files):
    models = ModelStore(tmp_path_factory.mktemp("adapters"))
    models.import_model("tiny-sd", store.get("tiny-sd").path, signatures={"__call__": {"batchable": True}})
    models.save_model("other", build_tiny_pipeline(seed=5))
    import_lora(models, "red", files["red"], "tiny-sd")
    import_lora(models, "blue", files["blue"], "tiny-sd")
    import_lora(models, "others", files["red"], "other")  # an adapter of a model served elsewhere
    import_embedding(models, "style", files["style"], "tiny-sd", TOKEN)
    return models


def direct(home: ModelStore, prompt: str, seed: int, loras=(), embedding: bool = False) -> np.ndarray:
    """The direct diffusers call: the base pipeline with the adapters loaded and set the documented way."""
    pipe = home.get("tiny-sd").load_pipeline("cpu")
    for name, _ in loras:
        pipe.load_lora_weights(str(home.get(name).path / "pytorch_lora_weights.safetensors"), adapter_name=name)
    if loras:
        pipe.set_adapters([name for name, _ in loras], adapter_weights=[weight for _, weight in loras])
    if embedding:
        pipe.load_textual_inversion(str(home.get("style").path / "style.safetensors"), token=TOKEN)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt=prompt, num_inference_steps=4, height=64, width=64, generator=generator).images[0]
    return np.asarray(image, dtype=np.int16)


def request(prompt: str, seed: int, loras=()) -> pb.TextToImageRequest:
    adapters = [pb.Adapter(name=name, weight=weight) for name, weight in loras]
    params = pb.GenerationParams(seed=seed, num_inference_steps=4, adapters=adapters)
    return pb.TextToImageRequest(model="tiny-sd", prompt=prompt, params=params)


def pixels(reply) -> np.ndarray:
    return decode(reply.images[0].image.data)


# --- the store ----------------------------------------------------------------------------------------------------


def test_adapters_are_stored_with_their_base_and_travel_in_archives(home, tmp_path):
    red = home.get("red")
    info = yaml.safe_load((red.path / "model.yaml").read_text())
    assert info["kind"] == "lora" and info["adapter"] == {
        "base": "tiny-sd",
        "weights": "pytorch_lora_weights.safetensors",
    }
    assert home.get("style").info.adapter["token"] == TOKEN
    red.check_files(full=True)
    archive = tmp_path / "red.tar.gz"
    export_model(home, "red", archive)
    copied = import_archive(ModelStore(tmp_path / "elsewhere"), archive)
    assert copied.tag == red.tag and copied.info.kind == "lora"


def test_adapters_that_do_not_fit_or_are_unsafe_are_refused(home, files, tmp_path):
    with pytest.raises(StoreError, match=r"does not fit tiny-sd .*size mismatch"):
        import_lora(home, "xl", files["xl"], "tiny-sd")  # an SDXL LoRA on an SD model
    pickled = tmp_path / "weights.bin"
    pickled.write_bytes(b"not really")
    with pytest.raises(StoreError, match="--allow-pickle"):
        import_lora(home, "pickled", pickled, "tiny-sd")
    with pytest.raises(StoreError, match="must look like <name>"):
        import_embedding(home, "bare", files["style"], "tiny-sd", "cat")
    assert {m.name for m in home.list_models()} == {"tiny-sd", "other", "red", "blue", "others", "style"}


def test_cli_imports_and_lists_adapters(files, tmp_path, store):
    env = {**os.environ, "DIFFUSERS_GRPC_HOME": str(tmp_path / "home")}

    def run(*args):
        return subprocess.run(cli("models", *args), env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)

    ModelStore(tmp_path / "home").import_model("tiny-sd", store.get("tiny-sd").path)  # `models import`: elsewhere
    done = run("import-lora", "red", str(files["red"].parent), "--base", "tiny-sd")
    assert done.returncode == 0 and "lora for tiny-sd" in done.stdout, done.stderr
    done = run("import-embedding", "style", str(files["style"]), "--base", "tiny-sd", "--token", TOKEN)
    assert done.returncode == 0, done.stderr
    listed = run("list").stdout
    assert "lora" in listed and "embedding" in listed and TOKEN in listed
    refused = run("import-lora", "xl", str(files["xl"]), "--base", "tiny-sd")
    assert refused.returncode == 1 and "does not fit" in refused.stderr


# --- serving ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", ["step", "request"])
def test_a_lora_changes_the_image_at_weight_one_and_not_at_zero_as_the_direct_call_does(home, batching):
    with running_server(home, tags=("tiny-sd",), batching=batching) as (_, target), DiffusionClient(target) as client:
        assert set(client.get_model().model.adapters) == {"red", "blue", "style"}
        base = pixels(client.stub.TextToImage(request("a fox", 3), timeout=60))
        full = pixels(client.stub.TextToImage(request("a fox", 3, [("red", 1.0)]), timeout=60))
        off = pixels(client.stub.TextToImage(request("a fox", 3, [("red", 0.0)]), timeout=60))
        both = pixels(client.stub.TextToImage(request("a fox", 3, [("blue", 0.5), ("red", 0.7)]), timeout=60))
    assert np.abs(full - base).mean() > 5 and np.abs(off - base).max() <= 1
    assert np.abs(full - direct(home, "a fox", 3, [("red", 1.0)])).max() <= 1
    assert np.abs(both - direct(home, "a fox", 3, [("blue", 0.5), ("red", 0.7)])).max() <= 1
    assert np.abs(base - direct(home, "a fox", 3)).max() <= 1


def test_mixed_adapters_share_steps_and_each_equals_its_direct_call(home):
    """Requests with different adapters, weights and none, held behind one running item so they join one set:
    every UNet call carries rows of several adapters (PEFT's mixed-batch path)."""
    work = [
        ("a fox", 10, [("red", 1.0)]),
        ("a fox", 11, [("blue", 1.0)]),
        ("a hut", 12, []),
        ("a hut", 13, [("red", 0.4)]),
        ("a boat", 14, [("blue", 0.8), ("red", 0.3)]),  # several adapters: its own set
    ]
    gate = Gate()
    with running_server(home, tags=("tiny-sd",), factory=gate.factory) as (server, target):
        stub = DiffusionClient(target).stub
        first = stub.TextToImage.future(request("first", 1, [("red", 1.0)]), timeout=120)
        assert gate.entered.wait(60)
        futures = [stub.TextToImage.future(request(prompt, seed, loras), timeout=120) for prompt, seed, loras in work]
        wait_for(lambda: len(server.executor.queue) == len(work), what="the requests to queue")
        gate.release.set()
        first.result(timeout=120)
        served = [pixels(f.result(timeout=120)) for f in futures]
    assert max(gate.ticks) >= 5  # the first item and the four single-adapter ones stepped together
    for (prompt, seed, loras), image in zip(work, served):
        assert np.abs(image - direct(home, prompt, seed, loras)).max() <= 1, (prompt, seed, loras)


def test_concurrent_traffic_with_and_without_adapters_keeps_each_image(home):
    work = [
        ("a fox", 20 + i, [("red", 1.0)] if i % 3 == 0 else [("blue", 0.5)] if i % 3 == 1 else []) for i in range(9)
    ]
    with (
        running_server(home, tags=("tiny-sd",)) as (_, target),
        DiffusionClient(target) as client,
        ThreadPoolExecutor(9) as pool,
    ):
        replies = list(pool.map(lambda w: client.stub.TextToImage(request(*w), timeout=120), work))
    for (prompt, seed, loras), reply in zip(work, replies):
        assert np.abs(pixels(reply) - direct(home, prompt, seed, loras)).max() <= 1


def test_an_embedding_is_used_through_its_token(home):
    with running_server(home, tags=("tiny-sd",)) as (_, target), DiffusionClient(target) as client:
        styled = pixels(client.stub.TextToImage(request(f"a fox in {TOKEN} style", 5), timeout=60))
        plain = pixels(client.stub.TextToImage(request("a fox in  style", 5), timeout=60))
    assert np.abs(styled - direct(home, f"a fox in {TOKEN} style", 5, embedding=True)).max() <= 1
    assert np.abs(styled - plain).mean() > 1


@pytest.mark.parametrize(
    ("loras", "field", "says"),
    [
        ([("nope", 1.0)], "params.adapters[0].name", "its adapters: blue, red"),
        ([("others", 1.0)], "params.adapters[0].name", "for other"),
        ([("style", 1.0)], "params.adapters[0].name", TOKEN),
        ([("red", 1.0), ("red", 0.5)], "params.adapters[1].name", "twice"),
        ([("red", float("nan"))], "params.adapters[0].weight", "finite"),
        ([("red", 10.5)], "params.adapters[0].weight", "[-10, 10]"),
    ],
)
def test_bad_adapters_are_refused_and_leave_nothing_active(home, loras, field, says):
    with running_server(home, tags=("tiny-sd",)) as (_, target), DiffusionClient(target) as client:
        base = pixels(client.stub.TextToImage(request("a fox", 3), timeout=60))
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.TextToImage(request("a fox", 3, loras), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_request_fields(caught.value) and says in caught.value.details()
        assert np.array_equal(pixels(client.stub.TextToImage(request("a fox", 3), timeout=60)), base)


def test_an_adapter_added_while_serving_becomes_usable_without_a_restart(home, files):
    with running_server(home, tags=("tiny-sd",)) as (_, target), DiffusionClient(target) as client:
        import_lora(home, "late", files["late"], "tiny-sd")
        wait_for(lambda: "late" in client.get_model().model.adapters, timeout=10, what="the new adapter to appear")
        late = pixels(client.stub.TextToImage(request("a fox", 3, [("late", 1.0)]), timeout=60))
    assert np.abs(late - direct(home, "a fox", 3, [("late", 1.0)])).max() <= 1
    home.delete("late")


def test_serving_only_named_adapters(home):
    with running_server(home, tags=("tiny-sd",), adapters=("red",)) as (_, target), DiffusionClient(target) as client:
        assert list(client.get_model().model.adapters) == ["red"]
    from model_store import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="nope"), running_server(home, tags=("tiny-sd",), adapters=("nope",)):
        pass
