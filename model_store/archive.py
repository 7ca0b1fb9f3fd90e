"""Model archives: a gzipped tarball of model.yaml and the pipeline files, for moving models between stores.

Import is defensive: only regular files and folders with relative, `..`-free names, each listed in model.yaml
with a matching sha256, are accepted; everything is written into the store's staging folder and published
atomically, so a bad archive leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from .custom import STORED_NAME as CUSTOM_FILE
from .custom import stored_file
from .errors import IntegrityError, StoreError, UntrustedCodeError
from .files import sha256_file
from .model import MODEL_FILE, Model, ModelInfo
from .store import ModelStore
from .tags import validate_part

_CHUNK = 1 << 20


def export_model(store: ModelStore, tag: str, dest: str | os.PathLike[str]) -> Model:
    """Write `tag` as a .tar.gz to a local path or an fsspec URL (`s3://bucket/key.tar.gz`)."""
    model = store.get(tag)
    model.check_files(full=True)
    files = [MODEL_FILE, *model.info.files]
    with _open_write(str(dest)) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for rel in _progress(files, f"export {model.tag}"):
            tar.add(model.path / rel, arcname=rel, recursive=False)
    return model


def import_archive(
    store: ModelStore, src: str | os.PathLike[str], *, overwrite: bool = False, trust_remote_code: bool = False
) -> Model:
    """Import an archive made by `export_model`, verifying every member; the tag is kept as it was.

    An archive whose model ships custom pipeline code is refused unless the operator passes
    `trust_remote_code=True` (`--trust-remote-code`): what model.yaml says about trust is never read.
    """
    staging = store.staging_folder("archive")
    try:
        with _open_read(str(src)) as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in _progress(list(tar), f"import {Path(str(src)).name}"):
                _extract(tar, member, staging)
        info = _read_info(staging)
        _verify(staging, info)
        if info.has_custom_code:
            if not trust_remote_code:
                raise UntrustedCodeError(
                    f"{src} holds custom pipeline code ({CUSTOM_FILE}); import it only with --trust-remote-code "
                    "(trust_remote_code=True) if you trust its author"
                )
            stored_file(staging, info.files, f"{info.name}:{info.version}")  # listed, and its checksum matches
        if not overwrite and (store.models_dir / info.name / info.version / MODEL_FILE).exists():
            raise StoreError(f"model {info.name}:{info.version} already exists (use overwrite to replace it)")
        return store.commit_staged(staging, info.name, info.version, overwrite=overwrite)
    except tarfile.TarError as exc:
        raise StoreError(f"{src} is not a readable model archive: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise StoreError(f"archive member {name!r} has an unsafe path")
    if member.isdir():
        (staging / name).mkdir(parents=True, exist_ok=True)
        return
    if not member.isreg():
        raise StoreError(f"archive member {name!r} is not a regular file (links and devices are refused)")
    target = staging / name
    if staging.resolve() not in target.resolve().parents:  # belt and braces after the checks above
        raise StoreError(f"archive member {name!r} would land outside the store")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


def _read_info(staging: Path) -> ModelInfo:
    try:
        data = yaml.safe_load((staging / MODEL_FILE).read_text(encoding="utf-8"))
        info = ModelInfo.from_dict(data)
    except FileNotFoundError:
        raise StoreError(f"the archive has no {MODEL_FILE}") from None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"the archive's {MODEL_FILE} is invalid: {exc}") from exc
    validate_part(info.name, "model name")
    validate_part(info.version, "model version")
    return info


def _verify(staging: Path, info: ModelInfo) -> None:
    present = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()} - {MODEL_FILE}
    listed = set(info.files)
    if present - listed:
        raise IntegrityError(f"archive holds files not listed in {MODEL_FILE}: {', '.join(sorted(present - listed))}")
    if listed - present:
        raise IntegrityError(f"archive lacks files listed in {MODEL_FILE}: {', '.join(sorted(listed - present))}")
    for rel, entry in info.files.items():
        if sha256_file(staging / rel) != entry["sha256"]:
            raise IntegrityError(f"checksum mismatch for {rel}: the archive is corrupt")


@contextmanager
def _open_write(dest: str) -> Any:
    if "://" in dest:
        import fsspec

        with fsspec.open(dest, "wb", **_remote_options(dest)) as f:
            yield f
        return
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # never a half-written archive
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def _open_read(src: str) -> Any:
    if "://" in src:
        import fsspec

        with fsspec.open(src, "rb", **_remote_options(src)) as f:
            yield f
        return
    with open(src, "rb") as f:
        yield f


def _remote_options(url: str) -> dict[str, Any]:
    from .remote import _storage_options

    return _storage_options(url)


def _progress(items: list[Any], label: str) -> Any:
    """A progress bar on a terminal; silent when output goes to a file or a pipe."""
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="file", disable=not sys.stderr.isatty(), file=sys.stderr)
