"""The on-disk store: publish, resolve tags, list, delete, and refuse bad input without writing anything."""

from __future__ import annotations

import pytest
import yaml

from model_store import (
    InvalidSignatureError,
    InvalidTagError,
    ModelExistsError,
    ModelNotFoundError,
    ModelStore,
)
from model_store.files import sha256_file


@pytest.fixture(scope="module")
def pipeline():
    from model_store.demo import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def test_save_get_list_and_latest_across_versions(tmp_path, pipeline):
    store = ModelStore(tmp_path)
    first = store.save_model("m", pipeline, version="v1")
    second = store.save_model("m", pipeline, version="v2")
    third = store.save_model("m", pipeline, version="v3")
    assert store.get("m").tag == store.get("m:latest").tag == third.tag == "m:v3"
    assert store.get("m:v1").tag == first.tag
    with pytest.raises(ModelNotFoundError, match="ambiguous"):
        store.get("m:v")  # a prefix of all three
    assert [m.tag for m in store.list_models()] == ["m:v1", "m:v2", "m:v3"]
    store.delete("m:v3")
    assert store.get("m").tag == second.tag
    store.delete("m")
    assert store.get("m").tag == "m:v1"
    store.delete("m:v1")
    assert store.list_models() == []
    with pytest.raises(ModelNotFoundError):
        store.get("m")


def test_model_yaml_records_signatures_tasks_and_checksums(tmp_path, pipeline):
    store = ModelStore(tmp_path)
    model = store.save_model(
        "m",
        pipeline,
        signatures={"__call__": {"batchable": True}, "img2img": {"batchable": True, "batch_dim": 0}},
        labels={"team": "vision"},
    )
    data = yaml.safe_load((model.path / "model.yaml").read_text())
    assert data["signatures"]["__call__"] == {"batchable": True, "batch_dim": 0, "task": "text2img"}
    assert data["signatures"]["img2img"]["task"] == "img2img"
    assert data["labels"] == {"team": "vision"}
    assert data["pipeline_class"] == "StableDiffusionPipeline"
    for rel, entry in data["files"].items():
        assert sha256_file(model.path / rel) == entry["sha256"]
    assert "unet/diffusion_pytorch_model.safetensors" in data["files"]


def test_default_signature_is_call_not_batchable(tmp_path, pipeline):
    model = ModelStore(tmp_path).save_model("m", pipeline)
    (sig,) = model.signatures.values()
    assert (sig.name, sig.batchable, sig.batch_dim, sig.task) == ("__call__", False, 0, "text2img")


def test_import_from_a_local_folder_copies_a_self_contained_model(tmp_path, pipeline):
    source = tmp_path / "src"
    pipeline.save_pretrained(source)
    store = ModelStore(tmp_path / "home")
    model = store.import_model("copy", source, signatures={"__call__": {"batchable": True}})
    assert model.info.pipeline_class == "StableDiffusionPipeline"
    assert (model.path / "unet" / "config.json").is_file()
    assert not any(p.is_symlink() for p in model.path.rglob("*"))


def test_get_accepts_a_unique_version_prefix(tmp_path, pipeline):
    store = ModelStore(tmp_path)
    model = store.save_model("m", pipeline)
    other = store.save_model("m", pipeline, version="zz-pinned")
    assert store.get(f"m:{model.version[:15]}").tag == model.tag
    assert store.get("m:zz").tag == other.tag


def test_existing_version_is_an_error_not_a_no_op(tmp_path, pipeline):
    store = ModelStore(tmp_path)
    store.save_model("m", pipeline, version="v1")
    with pytest.raises(ModelExistsError):
        store.save_model("m", pipeline, version="v1")


@pytest.mark.parametrize("name", ["../x", "A", "x:y", "", "n" * 64])
def test_invalid_name_at_import_writes_nothing(tmp_path, pipeline, name):
    store = ModelStore(tmp_path / "home")
    with pytest.raises(InvalidTagError):
        store.save_model(name, pipeline)
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("model.yaml"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("signatures", "message"),
    [
        ({"no_such_method": {}}, "has no method 'no_such_method'"),
        ({"__call__": {"batchable": "yes"}}, "batchable must be bool"),
        ({"__call__": {"batch_dim": 1.5}}, "batch_dim must be int"),
        ({"__call__": {"batchsize": 4}}, "unknown option"),
    ],
)
def test_bad_signatures_are_refused_naming_the_problem(tmp_path, pipeline, signatures, message):
    store = ModelStore(tmp_path)
    with pytest.raises(InvalidSignatureError, match=message):
        store.save_model("m", pipeline, signatures=signatures)
    assert store.list_models() == []
