"""Custom pipeline code from a local file, loaded only with explicit trust from the operator.

We import the file ourselves (never through diffusers' dynamic modules, which may reach for the hub) and keep
DIFFUSERS_DISABLE_REMOTE_CODE set, so nothing is fetched. The file is copied into the stored model as
`pipeline.py`, so the stored copy is self-contained.

Trust never comes from data: model.yaml only records *that* a model has code (`custom_pipeline: pipeline.py`),
the code is always `<model folder>/pipeline.py` with its recorded sha256, and it runs only when the operator
passes `--trust-remote-code` (import, import-archive, serve) or `trust_remote_code=True` in Python.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import IntegrityError, StoreError, UntrustedCodeError

STORED_NAME = "pipeline.py"


def source_file(custom_pipeline: str | os.PathLike[str]) -> Path:
    """The .py file named by a custom_pipeline option: a file, or a folder holding pipeline.py."""
    path = Path(custom_pipeline).expanduser()
    if path.is_dir():
        path = path / STORED_NAME
    if not path.is_file() or path.suffix != ".py":
        raise StoreError(
            f"custom_pipeline must be a local .py file or a folder with {STORED_NAME}, got {str(custom_pipeline)!r} "
            "(hub community pipelines are not fetched)"
        )
    return path


def require_trust(custom_pipeline: Any, trust_remote_code: bool) -> None:
    if custom_pipeline is not None and not trust_remote_code:
        raise UntrustedCodeError(
            f"custom_pipeline {str(custom_pipeline)!r} contains custom code: pass trust_remote_code=True "
            "(--trust-remote-code) if you trust it"
        )


def stored_file(folder: Path, files: Mapping[str, Mapping[str, Any]], tag: str) -> Path:
    """The custom code of a stored model: always `pipeline.py` inside its folder, checked against its sha256.

    Whatever path model.yaml names is ignored: a stored model runs only the file it was imported with.
    """
    from .files import sha256_file

    entry = files.get(STORED_NAME)
    path = folder / STORED_NAME
    if entry is None or not path.is_file():
        raise IntegrityError(f"{tag}: model.yaml says the model has custom code, but it holds no listed {STORED_NAME}")
    if sha256_file(path) != entry.get("sha256"):
        raise IntegrityError(f"{tag}: {STORED_NAME} does not match its recorded sha256")
    return path


def load_class(path: Path, class_name: str | None = None) -> type:
    """Import a trusted pipeline file and return its DiffusionPipeline subclass (by name, or the only one)."""
    from diffusers import DiffusionPipeline

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    module_name = f"diffusers_grpc_custom_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise StoreError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise StoreError(f"importing custom pipeline {path} failed: {exc!r}") from exc
    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, DiffusionPipeline) and obj.__module__ == module_name
    ]
    if class_name:
        classes = [c for c in classes if c.__name__ == class_name] or classes
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise StoreError(f"{path} must define exactly one DiffusionPipeline subclass; found {names}")
    return classes[0]
