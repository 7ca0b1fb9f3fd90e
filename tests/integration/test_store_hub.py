"""Importing by hub id works offline from a pre-seeded Hugging Face cache, and the stored copy stands alone."""

from __future__ import annotations

import hashlib
import os
import subprocess

from helpers import ROOT, cli

from model_store import ModelStore


def seed_hub_cache(cache, repo_id: str, folder) -> None:
    """Lay out `folder` as huggingface_hub caches a repo: blobs by hash, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_id_resolves_offline_from_the_cache(store, tmp_path):
    source = store.get("tiny-sd").path
    cache = tmp_path / "hf-cache"
    seed_hub_cache(cache, "acme/tiny-sd", source)
    home = tmp_path / "home"
    result = subprocess.run(
        cli("models", "import", "hubby", "acme/tiny-sd", "--signature", "__call__:batchable:0", "--json"),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    model = ModelStore(home).get("hubby")
    assert model.signatures["__call__"].batchable
    assert not any(p.is_symlink() for p in model.path.rglob("*"))  # self-contained: no links into the cache
    assert (model.path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        source / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    model.check_files(full=True)


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path):
    result = subprocess.run(
        cli("models", "import", "nope", "acme/not-cached"),
        env={
            **os.environ,
            "DIFFUSERS_GRPC_HOME": str(tmp_path / "h"),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(tmp_path / "empty"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "acme/not-cached" in result.stderr and "Traceback" not in result.stderr
