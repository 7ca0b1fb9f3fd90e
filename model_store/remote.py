"""A remote store on S3 (or any fsspec URL): model archives at `<root>/<name>/<version>.tar.gz`.

Many replicas share one remote store; each pulls what it serves into its local store, checksums verified, before
it reports ready. The endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so AWS, MinIO and moto work unchanged.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .archive import export_model, import_archive
from .errors import ModelNotFoundError
from .model import MODEL_FILE, Model
from .store import ModelStore
from .tags import Tag

SUFFIX = ".tar.gz"


class RemoteStore:
    """Model archives under an fsspec URL such as `s3://bucket/prefix`."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **_storage_options(self.url))

    def list_models(self) -> list[str]:
        """Every `name:version` held, sorted."""
        tags = []
        for path in self.fs.glob(f"{self.root}/*/*{SUFFIX}"):
            name, file = path.rsplit("/", 2)[-2:]
            tags.append(f"{name}:{file[: -len(SUFFIX)]}")
        return sorted(tags)

    def resolve(self, tag: str) -> str:
        """The full `name:version` for a tag (`latest` and version prefixes as in the local store)."""
        parsed = Tag.parse(tag)
        versions = [t.split(":", 1)[1] for t in self.list_models() if t.split(":", 1)[0] == parsed.name]
        if parsed.version:
            versions = [v for v in versions if v.startswith(parsed.version)]
            if len(versions) > 1 and parsed.version not in versions:
                raise ModelNotFoundError(f"version prefix {tag} is ambiguous in {self.url}")
            versions = [parsed.version] if parsed.version in versions else versions
        if not versions:
            raise ModelNotFoundError(f"model {tag!r} not found in {self.url}")
        return f"{parsed.name}:{versions[-1]}"

    def push(self, store: ModelStore, tag: str) -> str:
        """Upload a local model; returns the archive URL."""
        model = store.get(tag)
        dest = f"{self.url}/{model.name}/{model.version}{SUFFIX}"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / f"model{SUFFIX}"
            export_model(store, model.tag, local)
            self.fs.put_file(str(local), self._path(model.name, model.version))
        return dest

    def pull(self, tag: str, into: ModelStore) -> Model:
        """Download a model into the local store (verifying every checksum); a model already there is reused."""
        full = self.resolve(tag)
        name, version = full.split(":", 1)
        if (into.models_dir / name / version / MODEL_FILE).is_file():
            return into.get(full)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / f"model{SUFFIX}"
            self.fs.get_file(self._path(name, version), str(local))
            return import_archive(into, local)

    def _path(self, name: str, version: str) -> str:
        return f"{self.root}/{name}/{version}{SUFFIX}"


def _storage_options(url: str) -> dict[str, Any]:
    """s3fs reads credentials from the environment itself; the endpoint we pass explicitly for older stacks."""
    if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}
