"""Resolve an import source: a local pipeline folder, or a hub id through huggingface_hub's cache."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import StoreError

# Only what a diffusers pipeline needs; never pickled weights unless the user asked (the model store issue).
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "*.py"]


def resolve_source(source: str | os.PathLike[str], *, revision: str | None, variant: str | None) -> Path:
    """Return a local folder holding the pipeline named by `source`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise StoreError(f"source {text!r} is not a folder holding a diffusers pipeline")
    from huggingface_hub import snapshot_download

    try:
        # snapshot_download answers from the local cache when HF_HUB_OFFLINE=1 or the hub is unreachable.
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise StoreError(f"cannot resolve {text!r} as a local folder or a hub id: {exc}") from exc
