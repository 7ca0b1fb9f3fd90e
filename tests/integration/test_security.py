"""What a security probe found, each with its regression test: trust comes from the operator, never from data."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, cli, free_port

from model_store import IntegrityError, ModelStore, UntrustedCodeError
from model_store.archive import import_archive
from model_store.files import sha256_file

# Custom code that leaves a marker file when Python imports it: if the marker exists, the code ran.
EVIL = """
from pathlib import Path
from diffusers import StableDiffusionPipeline

Path({marker!r}).write_text("ran")


class EvilPipeline(StableDiffusionPipeline):
    pass
"""


def _archive(tmp_path: Path, store: ModelStore, options: dict, code: dict[str, str]) -> Path:
    """An archive of the demo model whose model.yaml carries `options` and which ships the files in `code`."""
    folder = tmp_path / "evil-model"
    shutil.copytree(store.get("tiny-sd").path, folder)
    info = yaml.safe_load((folder / "model.yaml").read_text())
    for name, text in code.items():
        (folder / name).write_text(text)
        info["files"][name] = {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
    info.update(name="evil", version="v1", pipeline_class="EvilPipeline", options=options)
    (folder / "model.yaml").write_text(yaml.safe_dump(info))
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                tar.add(file, arcname=file.relative_to(folder).as_posix())
    return path


def test_an_archive_cannot_grant_its_own_code_trust(store, tmp_path):
    marker = tmp_path / "ran-inside"
    archive = _archive(
        tmp_path,
        store,
        {"custom_pipeline": "pipeline.py", "trust_remote_code": True},
        {"pipeline.py": EVIL.format(marker=str(marker))},
    )
    target = ModelStore(tmp_path / "target")
    with pytest.raises(UntrustedCodeError, match="--trust-remote-code"):
        import_archive(target, archive)
    assert target.list_models() == [] and not marker.exists()

    # The operator accepts the archive; serving it still needs the operator's flag, whatever model.yaml says.
    model = import_archive(target, archive, trust_remote_code=True)
    assert not marker.exists()
    with pytest.raises(UntrustedCodeError, match="serve --trust-remote-code"):
        model.pipeline_type()
    assert not marker.exists()
    assert model.with_options(trust_remote_code=True).pipeline_type().__name__ == "EvilPipeline"
    assert marker.exists()  # trusted by the operator: now, and only now, it runs


def test_model_yaml_cannot_point_custom_code_outside_the_model(store, tmp_path):
    marker = tmp_path / "ran-outside"
    outside = tmp_path / "outside.py"
    outside.write_text(EVIL.format(marker=str(marker)))
    archive = _archive(tmp_path, store, {"custom_pipeline": str(outside), "trust_remote_code": True}, {})
    target = ModelStore(tmp_path / "target")
    with pytest.raises(UntrustedCodeError):
        import_archive(target, archive)
    with pytest.raises(IntegrityError, match=r"no listed pipeline\.py"):
        import_archive(target, archive, trust_remote_code=True)
    assert target.list_models() == [] and not marker.exists()


def test_serve_refuses_untrusted_code_before_opening_a_port(store, tmp_path):
    marker = tmp_path / "ran-at-serve"
    archive = _archive(tmp_path, store, {"custom_pipeline": "pipeline.py"}, {"pipeline.py": EVIL.format(marker=marker)})
    home = tmp_path / "home"
    import_archive(ModelStore(home), archive, trust_remote_code=True)
    port = free_port()
    result = subprocess.run(
        cli("serve", "evil", "--host", "127.0.0.1", "--port", str(port)),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "evil:v1" in result.stderr and "--trust-remote-code" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
