"""A local, versioned store of diffusers pipelines.

Module-level functions act on the default store at `$DIFFUSERS_GRPC_HOME` (default `~/.diffusers-grpc`), read
when each function is called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .errors import (
    IntegrityError,
    InvalidSignatureError,
    InvalidTagError,
    ModelExistsError,
    ModelNotFoundError,
    StoreError,
    UntrustedCodeError,
)
from .model import Model, ModelInfo
from .options import LoadOptions
from .signatures import Signature
from .store import ModelStore, default_home
from .tags import Tag

__all__ = [
    "IntegrityError",
    "InvalidSignatureError",
    "InvalidTagError",
    "LoadOptions",
    "Model",
    "ModelExistsError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelStore",
    "Signature",
    "StoreError",
    "Tag",
    "UntrustedCodeError",
    "default_home",
    "delete",
    "export_model",
    "get",
    "import_archive",
    "import_model",
    "list_models",
    "save_model",
]


def import_model(name: str, source: str | os.PathLike[str], **kwargs: Any) -> Model:
    """Import a pipeline folder or hub id into the default store; see ModelStore.import_model."""
    return ModelStore().import_model(name, source, **kwargs)


def save_model(name: str, pipeline: Any, *, signatures: Mapping[str, Any] | None = None, **kwargs: Any) -> Model:
    """Store an in-memory pipeline in the default store; see ModelStore.save_model."""
    return ModelStore().save_model(name, pipeline, signatures=signatures, **kwargs)


def get(tag: str) -> Model:
    """Find a model in the default store by `name`, `name:latest`, `name:version` or a version prefix."""
    return ModelStore().get(tag)


def list_models() -> list[Model]:
    """Every model in the default store."""
    return ModelStore().list_models()


def delete(tag: str) -> Model:
    """Delete a model version from the default store."""
    return ModelStore().delete(tag)


def export_model(tag: str, dest: str | os.PathLike[str]) -> Model:
    """Write a model of the default store as a .tar.gz (a local path or `s3://bucket/key.tar.gz`)."""
    from .archive import export_model as export

    return export(ModelStore(), tag, dest)


def import_archive(src: str | os.PathLike[str], *, overwrite: bool = False, trust_remote_code: bool = False) -> Model:
    """Import an archive (a local path or `s3://...`) into the default store, verifying every checksum."""
    from .archive import import_archive as load

    return load(ModelStore(), src, overwrite=overwrite, trust_remote_code=trust_remote_code)
