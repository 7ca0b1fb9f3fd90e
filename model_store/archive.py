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
DEFAULT_MAX_BYTES = 64 << 30  # larger than any diffusers pipeline in float32 today; raise it with max_bytes
MAX_MODEL_FILE_BYTES = 1 << 20


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
    store: ModelStore,
    src: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Model:
    """Import an archive made by `export_model`, verifying every member; the tag is kept as it was.

    Nothing is written before the archive is known to fit: its first member must be model.yaml (as export_model
    writes it), every other member must be a file it lists, with the size it lists, and the total must stay under
    `max_bytes` and the free disk space. A small archive that would unpack into gigabytes is refused from its
    headers. An archive whose model ships custom pipeline code is refused unless the operator passes
    `trust_remote_code=True` (`--trust-remote-code`): what model.yaml says about trust is never read.
    """
    staging = store.staging_folder("archive")
    try:
        with _open_read(str(src)) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            members = iter(tar)  # a stream: each header is read before its data, and checked first
            info = _read_first_info(tar, next(members, None), staging)
            _check_fits(info, staging, max_bytes)
            for member in members:
                _check_member(member, info)
                _extract(tar, member, staging)
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
        store.discard_staged(staging)


def _read_first_info(tar: tarfile.TarFile, member: tarfile.TarInfo | None, staging: Path) -> ModelInfo:
    if member is None:
        raise StoreError(f"the archive is empty: it has no {MODEL_FILE}")
    _check_path(member.name)
    if member.name != MODEL_FILE or not member.isreg():
        raise StoreError(f"the archive's first member must be {MODEL_FILE} (as export writes it), not {member.name!r}")
    if member.size > MAX_MODEL_FILE_BYTES:
        raise StoreError(f"the archive's {MODEL_FILE} is {member.size} bytes; the limit is {MAX_MODEL_FILE_BYTES}")
    _extract(tar, member, staging)
    return _read_info(staging)


def _check_fits(info: ModelInfo, staging: Path, max_bytes: int) -> None:
    try:
        total = sum(int(entry["size"]) for entry in info.files.values())
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"the archive's {MODEL_FILE} lists a file without a size: {exc}") from None
    if total > max_bytes:
        raise StoreError(f"the archive unpacks to {total} bytes, over the limit of {max_bytes} (max_bytes)")
    free = shutil.disk_usage(staging).free
    if total > free:
        raise StoreError(f"the archive unpacks to {total} bytes; the store's disk has {free} free")


def _check_member(member: tarfile.TarInfo, info: ModelInfo) -> None:
    """A member may be a folder, or a regular file listed in model.yaml with the size it declares."""
    _check_path(member.name)
    if member.isdir():
        return
    if not member.isreg():
        raise StoreError(f"archive member {member.name!r} is not a regular file (links and devices are refused)")
    entry = info.files.get(member.name)
    if entry is None:
        raise IntegrityError(f"archive member {member.name!r} is not listed in {MODEL_FILE}")
    if member.size != entry.get("size"):
        raise IntegrityError(
            f"archive member {member.name!r} is {member.size} bytes; {MODEL_FILE} says {entry.get('size')}"
        )


def _check_path(name: str) -> None:
    parts = PurePosixPath(name).parts
    unsafe = not name or name.startswith("/") or PurePosixPath(name).is_absolute() or ".." in parts
    if unsafe or "\\" in name:
        raise StoreError(f"archive member {name!r} has an unsafe path")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path) -> None:
    name = member.name
    _check_path(name)
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
    with source, open(target, "wb") as out:  # extractfile yields exactly member.size bytes, checked above
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
