"""Archives and the S3 remote store: round trips, corruption, hostile members, and the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest
import yaml
from helpers import ROOT, cli

from model_store import IntegrityError, ModelStore, StoreError
from model_store.archive import export_model, import_archive
from model_store.remote import RemoteStore


@pytest.fixture(scope="module")
def source(tmp_path_factory, store):
    """A store with one labelled model, copied from the session's demo model."""
    home = ModelStore(tmp_path_factory.mktemp("source"))
    home.import_model("arch", store.get("tiny-sd").path, labels={"team": "a"}, metadata={"note": "x"}, version="v1")
    return home


def same_model(a, b) -> None:
    assert a.tag == b.tag and a.info.files == b.info.files
    assert a.info.labels == b.info.labels and a.info.metadata == b.info.metadata
    assert a.info.created == b.info.created and a.signatures == b.signatures
    for rel in a.info.files:
        assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes()


def test_export_then_import_gives_an_identical_model(source, tmp_path):
    archive = tmp_path / "m.tar.gz"
    export_model(source, "arch:v1", archive)
    target = ModelStore(tmp_path / "target")
    same_model(import_archive(target, archive), source.get("arch:v1"))
    with pytest.raises(StoreError, match="already exists"):
        import_archive(target, archive)
    assert import_archive(target, archive, overwrite=True).tag == "arch:v1"


def test_a_flipped_byte_is_refused(source, tmp_path):
    archive = tmp_path / "m.tar.gz"
    export_model(source, "arch:v1", archive)
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]
    corrupt = tmp_path / "corrupt.tar.gz"
    with tarfile.open(corrupt, "w:gz") as tar:
        for member, data in members:
            if member.name.endswith(".safetensors"):
                data = bytes([data[0] ^ 1]) + data[1:]
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    target = ModelStore(tmp_path / "target")
    with pytest.raises(IntegrityError, match="checksum"):
        import_archive(target, corrupt)
    assert target.list_models() == []
    assert not any((tmp_path / "target" / ".tmp").iterdir())


def _hostile(tmp_path, name, kind=tarfile.REGTYPE, linkname=""):
    """A well-formed start (a model.yaml listing nothing), then the hostile member."""
    path = tmp_path / f"hostile-{abs(hash(name))}.tar.gz"
    manifest = yaml.safe_dump(
        {"name": "h", "version": "v1", "created": "", "pipeline_class": "X", "signatures": {}, "files": {}}
    ).encode()
    with tarfile.open(path, "w:gz") as tar:
        head = tarfile.TarInfo("model.yaml")
        head.size = len(manifest)
        tar.addfile(head, io.BytesIO(manifest))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        data = b"pwned"
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "linkname"),
    [
        ("../evil", tarfile.REGTYPE, ""),
        ("a/../../evil", tarfile.REGTYPE, ""),
        ("/tmp/evil-absolute", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard", tarfile.LNKTYPE, "model.yaml"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
def test_hostile_members_are_refused_and_nothing_is_written_outside(tmp_path, name, kind, linkname):
    home = tmp_path / "home" / "store"
    target = ModelStore(home)
    with pytest.raises(StoreError, match=r"unsafe path|not a regular file"):
        import_archive(target, _hostile(tmp_path, name, kind, linkname))
    assert not (tmp_path / "home" / "evil").exists() and not (home / "evil").exists()
    assert not os.path.exists("/tmp/evil-absolute")
    assert target.list_models() == []


def test_remote_store_push_list_and_pull_on_s3(source, tmp_path, bucket):
    remote = RemoteStore(f"s3://{bucket}/models")
    url = remote.push(source, "arch:v1")
    assert url == f"s3://{bucket}/models/arch/v1.tar.gz"
    assert remote.list_models() == ["arch:v1"]
    assert remote.resolve("arch") == "arch:v1"
    local = ModelStore(tmp_path / "cache")
    same_model(remote.pull("arch", into=local), source.get("arch:v1"))
    assert remote.pull("arch:v1", into=local).tag == "arch:v1"  # already there: reused


def test_export_and_import_archive_to_s3_urls(source, tmp_path, bucket):
    url = f"s3://{bucket}/exports/arch.tar.gz"
    export_model(source, "arch:v1", url)
    same_model(import_archive(ModelStore(tmp_path / "t"), url), source.get("arch:v1"))


def test_cli_export_and_import_archive(source, tmp_path):
    archive = tmp_path / "cli.tar.gz"
    run = lambda *args, home: subprocess.run(  # noqa: E731
        cli("models", *args),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    exported = run("export", "arch:v1", str(archive), home=source.home)
    assert exported.returncode == 0, exported.stderr
    imported = run("import-archive", str(archive), home=tmp_path / "cli-home")
    assert imported.returncode == 0 and "imported arch:v1" in imported.stdout
    again = run("import-archive", str(archive), home=tmp_path / "cli-home")
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = run("list", "--json", home=tmp_path / "cli-home")
    assert '"tag": "arch:v1"' in listed.stdout
