"""Adapters are held to the store's rules whatever their origin (an archive, S3, a folder copied by hand): a bad
entry is left out with one warning and never stops the server; re-imports and deletes take effect while it runs;
a request names a bounded number of adapters; an adapter that does not load is the request's INVALID_ARGUMENT."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import grpc
import numpy as np
import pytest
import yaml
from helpers import READINESS, ROOT, bad_request_fields, cli, decode, health_status, wait_for
from inprocess import running_server

from model_store import ModelStore
from model_store.adapters import import_embedding, import_lora
from model_store.demo import build_tiny_pipeline
from model_store.files import sha256_file
from model_store.tiny_families import save_tiny_embedding, save_tiny_lora
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb
from service.workers import backend_factory

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the direct calls'
SERVING = 1
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rule-files")
    demo = build_tiny_pipeline(seed=0)
    return {
        "red": save_tiny_lora(demo, folder / "red", seed=1),
        "blue": save_tiny_lora(demo, folder / "blue", seed=2),
        "style": save_tiny_embedding(demo, folder / "style.safetensors", token="<style>", scale=6.0),
    }


@pytest.fixture
def home(tmp_path, store, files):
    models = ModelStore(tmp_path / "store")
    models.import_model("tiny-sd", store.get("tiny-sd").path, signatures={"__call__": {"batchable": True}})
    import_lora(models, "red", files["red"], "tiny-sd")
    import_embedding(models, "style", files["style"], "tiny-sd", "<style>")
    return models


def planted(home: ModelStore, source: str, name: str, edit) -> None:
    """A copy of a stored adapter under another name, changed by `edit(folder, model_yaml)`: what an archive or a
    bucket could hold, never checked by an import."""
    original = home.get(source)
    folder = home.models_dir / name / original.version
    shutil.copytree(original.path, folder)
    info = yaml.safe_load((folder / "model.yaml").read_text())
    info["name"] = name
    edit(folder, info)
    (folder / "model.yaml").write_text(yaml.safe_dump(info))
    (home.models_dir / name / "latest").write_text(original.version)


def rename_weights(folder, info, new: str) -> None:
    old = info["adapter"]["weights"]
    os.rename(folder / old, folder / new)
    info["adapter"]["weights"] = new
    info["files"][new] = info["files"].pop(old)


def request(seed: int, loras=()) -> pb.TextToImageRequest:
    adapters = [pb.Adapter(name=name, weight=weight) for name, weight in loras]
    return pb.TextToImageRequest(
        model="tiny-sd", prompt="a fox", params=pb.GenerationParams(seed=seed, num_inference_steps=4, adapters=adapters)
    )


def capturing():
    """A backend factory that keeps the workers it builds, to look at their replicas."""
    built = []

    def factory(served, device, warmup):
        build = backend_factory(served, device, warmup)

        def make():
            worker = build()
            built.append(worker)
            return worker

        return make

    return factory, built


def test_bad_adapter_entries_are_left_out_with_one_warning_each_and_the_server_serves(home, caplog):
    caplog.set_level(logging.WARNING, logger="service.registry")
    planted(home, "red", "pickled", lambda folder, info: rename_weights(folder, info, "weights.bin"))
    planted(home, "red", "escaping", lambda folder, info: info["adapter"].update(weights="/etc/passwd"))
    planted(home, "red", "dotted", lambda folder, info: info["adapter"].update(weights="../../tiny-sd"))
    planted(home, "style", "short-token", lambda folder, info: info["adapter"].update(token="x"))

    def flipped(folder, info):
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[-1] ^= 0xFF  # same size: only the hash can tell
        (folder / WEIGHTS).write_bytes(bytes(data))

    planted(home, "red", "flipped", flipped)

    def fifo(folder, info):
        os.unlink(folder / WEIGHTS)
        os.mkfifo(folder / WEIGHTS)  # reading it would hang the server's start

    planted(home, "red", "fifo", fifo)
    broken = home.models_dir / "truncated" / "v1"  # another base's entry, cut short
    broken.mkdir(parents=True)
    (broken / "model.yaml").write_text("name: truncated\nversion: v1\nkind: lora\nadapter: {base: ot")

    with running_server(home, tags=("tiny-sd",)) as (_, target), DiffusionClient(target) as client:
        assert health_status(target, READINESS) == SERVING
        assert sorted(client.get_model().model.adapters) == ["red", "style"]
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.TextToImage(request(1, [("pickled", 1.0)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.stub.TextToImage(request(1, [("red", 1.0)]), timeout=60).images
    said = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    for name in (
        "adapter pickled:",
        "adapter escaping:",
        "adapter dotted:",
        "adapter short-token:",
        "adapter flipped:",
    ):
        assert sum(name in line for line in said) == 1, (name, said)  # once, not at every refresh
    for name in ("entry fifo/", "entry truncated/"):  # entries that do not even load
        assert sum(name in line for line in said) == 1, (name, said)
    listing = subprocess.run(
        cli("models", "list"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home.home)},
    )
    assert listing.returncode == 0, listing.stderr
    assert "truncated:v1" in listing.stdout and "broken" in listing.stdout
    assert "pickle file" in listing.stdout.split("pickled:", 1)[1].split("\n", 2)[1]


def test_a_pickle_adapter_is_served_only_with_the_servers_own_allow_pickle(home):
    planted(home, "red", "pickled", lambda folder, info: rename_weights(folder, info, "weights.bin"))
    with running_server(home, tags=("tiny-sd",), allow_pickle=True) as (_, target), DiffusionClient(target) as client:
        assert "pickled" in client.get_model().model.adapters


def test_reimport_and_delete_take_effect_on_a_running_server_and_unload_the_weights(home, files):
    factory, built = capturing()
    with running_server(home, tags=("tiny-sd",), factory=factory) as (_, target), DiffusionClient(target) as client:
        import_lora(home, "swap", files["red"], "tiny-sd")
        wait_for(lambda: "swap" in client.get_model().model.adapters, timeout=20, what="the adapter to appear")
        as_red = decode(client.stub.TextToImage(request(3, [("swap", 1.0)]), timeout=60).images[0].image.data)
        red = decode(client.stub.TextToImage(request(3, [("red", 1.0)]), timeout=60).images[0].image.data)
        assert np.abs(as_red - red).max() <= 1
        replica = built[0].adapters[client.get_model().model.tag]
        assert "swap" in replica.loras

        import_lora(home, "swap", files["blue"], "tiny-sd")  # a new version under the same name

        def swapped():
            image = decode(client.stub.TextToImage(request(3, [("swap", 1.0)]), timeout=60).images[0].image.data)
            return [image] if np.abs(image - as_red).max() > 1 else None

        (as_blue,) = wait_for(swapped, timeout=30, what="the re-imported weights to be served")
        import_lora(home, "blue", files["blue"], "tiny-sd")
        wait_for(lambda: "blue" in client.get_model().model.adapters, timeout=20, what="blue to appear")
        blue = decode(client.stub.TextToImage(request(3, [("blue", 1.0)]), timeout=60).images[0].image.data)
        assert np.abs(as_blue - blue).max() <= 1

        for version in home.list_models("swap"):  # every version: deleting the newest would serve the one before
            home.delete(version.tag)
        wait_for(lambda: "swap" not in client.get_model().model.adapters, timeout=20, what="the delete to be seen")
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.TextToImage(request(3, [("swap", 1.0)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.stub.TextToImage(request(3, [("red", 1.0)]), timeout=60)  # the next use of the replica
        assert "swap" not in replica.loras  # unloaded: its weights are freed


def test_an_adapter_that_does_not_load_fails_its_request_with_invalid_argument(home):
    from safetensors.torch import load_file, save_file

    def misshapen(folder, info):
        tensors = load_file(str(folder / WEIGHTS))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first][..., :1].contiguous()  # a shape no module has
        save_file(tensors, str(folder / WEIGHTS))
        info["files"][WEIGHTS] = {"sha256": sha256_file(folder / WEIGHTS), "size": (folder / WEIGHTS).stat().st_size}

    planted(home, "red", "misshapen", misshapen)
    with running_server(home, tags=("tiny-sd",)) as (_, target), DiffusionClient(target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.TextToImage(request(1, [("misshapen", 1.0)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "misshapen cannot be loaded" in caught.value.details()
        assert "state_dict" not in caught.value.details()  # the library's words stay in the log
        assert client.stub.TextToImage(request(1, [("red", 1.0)]), timeout=60).images
        assert health_status(target, READINESS) == SERVING


def test_a_request_names_at_most_max_adapters_per_request(home):
    many = [(f"unknown-{i}", 1.0) for i in range(100_000)]
    with (
        running_server(home, tags=("tiny-sd",), max_adapters_per_request=1) as (_, target),
        DiffusionClient(target) as client,
        pytest.raises(grpc.RpcError) as caught,
    ):
        client.stub.TextToImage(request(1, [("red", 1.0), *many]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["params.adapters"]


def test_an_adapter_import_has_a_size_cap(home, files):
    from model_store import StoreError

    with pytest.raises(StoreError, match="over the limit of"):
        import_lora(home, "big", files["red"], "tiny-sd", max_bytes=1024)
    assert "big" not in {m.name for m in home.list_models()}
