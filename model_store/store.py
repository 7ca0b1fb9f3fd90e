"""The on-disk model store: `<home>/models/<name>/<version>/` with model.yaml, published atomically.

Writers build a model inside `<home>/.tmp/`, fsync it, and rename it into place under a per-name file lock, then
replace `<home>/models/<name>/latest` atomically. A crash at any point leaves at most an orphan in `.tmp/`,
which is never listed and is swept by the next writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from .custom import STORED_NAME as CUSTOM_FILE
from .custom import load_class, require_trust, source_file
from .errors import ModelExistsError, ModelNotFoundError, StoreError
from .files import atomic_write_text, copy_tree, fsync_dir, fsync_tree, list_files, pickle_weights, sha256_file
from .model import MODEL_FILE, Model, ModelInfo, resolve_pipeline_class
from .options import STORED_KEYS, check_stored
from .signatures import parse_signatures
from .tags import LATEST, Tag, new_version, validate_part

HOME_ENV = "DIFFUSERS_GRPC_HOME"
_STALE_TMP_SECONDS = 3600
OWNER_SUFFIX = ".owner"
_OWNED: dict[str, FileLock] = {}  # staging folders this process is building, with the locks that say so


def default_home() -> Path:
    """The store home: $DIFFUSERS_GRPC_HOME, else ~/.diffusers-grpc (read at call time, never at import)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".diffusers-grpc").expanduser()


class ModelStore:
    """A local, versioned store of diffusers pipelines."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.models_dir = self.home / "models"
        self._tmp_dir = self.home / ".tmp"
        self._locks_dir = self.home / ".locks"

    # --- reading -----------------------------------------------------------------------------------------

    def get(self, tag: str | Tag) -> Model:
        """Find a model by `name`, `name:latest`, `name:version` or a unique version prefix."""
        parsed = tag if isinstance(tag, Tag) else Tag.parse(tag)
        version = parsed.version or self._latest_version(parsed.name)
        folder = self.models_dir / parsed.name / version
        if not (folder / MODEL_FILE).is_file():
            folder = self.models_dir / parsed.name / self._match_prefix(parsed.name, version)
        return Model.load(folder)

    def list_models(self, name: str | None = None) -> list[Model]:
        """Every stored model (or every version of `name`), sorted by name then version. An entry that cannot be
        read (truncated, half-copied by hand) is left out: `broken_entries` names it, and one bad entry never
        hides the others."""
        return self.scan(name)[0]

    def broken_entries(self, name: str | None = None) -> list[tuple[Path, str]]:
        """The entries `list_models` leaves out, with why."""
        return self.scan(name)[1]

    def scan(self, name: str | None = None) -> tuple[list[Model], list[tuple[Path, str]]]:
        """(the models that load, the entries that do not with why), in one pass over the store."""
        if not self.models_dir.is_dir():
            return [], []
        names = [name] if name else sorted(p.name for p in self.models_dir.iterdir() if p.is_dir())
        models, broken = [], []
        for model_name in names:
            for version in self._versions(model_name):
                folder = self.models_dir / model_name / version
                try:
                    models.append(Model.load(folder))
                except Exception as exc:  # whatever a damaged model.yaml makes the parser raise
                    broken.append((folder, f"{type(exc).__name__}: {str(exc)[:200]}"))
        return models, broken

    def _versions(self, name: str) -> list[str]:
        folder = self.models_dir / name
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / MODEL_FILE).is_file())

    def _latest_version(self, name: str) -> str:
        pointer = self.models_dir / name / LATEST
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            version = ""
        if version and (self.models_dir / name / version / MODEL_FILE).is_file():
            return version
        versions = self._versions(name)  # the pointer is missing or stale: fall back to the newest
        if not versions:
            raise ModelNotFoundError(f"model {name!r} not found in the store at {self.home}")
        return versions[-1]

    def _match_prefix(self, name: str, prefix: str) -> str:
        matches = [v for v in self._versions(name) if v.startswith(prefix)]
        if not matches:
            raise ModelNotFoundError(f"model {name}:{prefix} not found in the store at {self.home}")
        if len(matches) > 1:
            raise ModelNotFoundError(f"version prefix {name}:{prefix} is ambiguous: matches {', '.join(matches)}")
        return matches[0]

    # --- writing -----------------------------------------------------------------------------------------

    def import_model(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        signatures: Mapping[str, Any] | None = None,
        tasks: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        pipeline_class: str | type | None = None,
        variant: str | None = None,
        revision: str | None = None,
        version: str | None = None,
        custom_pipeline: str | os.PathLike[str] | None = None,
        trust_remote_code: bool = False,
        options: Mapping[str, Any] | None = None,
        allow_pickle: bool = False,
    ) -> Model:
        """Copy a diffusers pipeline folder (or a hub id, resolved through the local HF cache) into the store.

        `custom_pipeline` is a local .py file (or folder with pipeline.py) whose DiffusionPipeline subclass
        replaces the folder's class; it is copied into the model and needs `trust_remote_code=True`.
        `tasks` overrides the task derived for named signatures. `options` are load options stored with the
        model (`model_store.options.STORED_KEYS`), applied when it is served unless the operator overrides them.
        """
        from .sources import resolve_source

        validate_part(name, "model name")
        require_trust(custom_pipeline, trust_remote_code)
        folder = resolve_source(source, revision=revision, variant=variant)
        shadowed, alone = pickle_weights(folder)
        if alone and not allow_pickle:
            names = ", ".join(str(p.relative_to(folder)) for p in alone[:3])
            raise StoreError(
                f"{folder} holds pickle weights with no safetensors beside them ({names}): loading them can run code. "
                "Convert them to safetensors, or pass --allow-pickle (serving then needs serve --allow-pickle)"
            )
        custom_file = source_file(custom_pipeline) if custom_pipeline is not None else None
        pipeline_cls = load_class(custom_file) if custom_file else _stored_class(folder, pipeline_class)

        def fill(target: Path) -> None:
            copy_tree(folder, target, skip_files=frozenset(shadowed))  # never loaded: safetensors are
            if custom_file is not None:
                shutil.copyfile(custom_file, target / CUSTOM_FILE)

        stored = _stored_options({**(options or {}), **({"variant": variant} if variant else {})})
        if custom_file is not None:
            stored["custom_pipeline"] = CUSTOM_FILE  # a fact about the model; trust is never recorded
        return self._publish(name, fill, pipeline_cls, signatures, tasks, labels, metadata, version, stored)

    def save_model(
        self,
        name: str,
        pipeline: Any,
        *,
        signatures: Mapping[str, Any] | None = None,
        tasks: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        version: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Model:
        """Store an in-memory pipeline object (saved with safetensors)."""
        validate_part(name, "model name")
        stored = _stored_options(options or {})

        def fill(target: Path) -> None:
            pipeline.save_pretrained(target, safe_serialization=True)

        return self._publish(name, fill, type(pipeline), signatures, tasks, labels, metadata, version, stored)

    def _publish(
        self,
        name: str,
        fill: Any,
        pipeline_cls: type,
        signatures: Mapping[str, Any] | None,
        tasks: Mapping[str, str] | None,
        labels: Mapping[str, str] | None,
        metadata: Mapping[str, Any] | None,
        version: str | None,
        options: Mapping[str, Any],
    ) -> Model:
        parsed = parse_signatures(signatures, pipeline_cls, tasks)
        fields = {
            "pipeline_class": pipeline_cls.__name__,
            "signatures": parsed,
            "options": {k: v for k, v in options.items() if v is not None},
        }
        return self.write_model(name, version, fill, labels, metadata, fields)

    def write_model(
        self,
        name: str,
        version: str | None,
        fill: Any,
        labels: Mapping[str, str] | None,
        metadata: Mapping[str, Any] | None,
        fields: Mapping[str, Any],
    ) -> Model:
        """Build a model (pipeline or adapter) in staging with `fill`, record its model.yaml with `fields` and every
        file's sha256, and publish it atomically."""
        import diffusers
        import torch

        validate_part(name, "model name")
        version = validate_part(version, "model version") if version else new_version()
        if version == LATEST:
            raise StoreError("'latest' is reserved and cannot be used as a version")
        for key, value in (labels or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise StoreError(f"labels must map strings to strings, got {key!r}: {value!r}")
        staging = self.staging_folder(f"{name}-{version}")
        try:
            fill(staging)
            (staging / MODEL_FILE).unlink(missing_ok=True)  # importing a stored model's folder: ours replaces it
            info = ModelInfo(
                name=name,
                version=version,
                created=datetime.now(timezone.utc).isoformat(),
                diffusers_version=diffusers.__version__,
                torch_version=torch.__version__.split("+")[0],
                labels=dict(labels or {}),
                metadata=dict(metadata or {}),
                files={
                    rel: {"sha256": sha256_file(staging / rel), "size": (staging / rel).stat().st_size}
                    for rel in list_files(staging)
                },
                **fields,
            )
            (staging / MODEL_FILE).write_text(yaml.safe_dump(info.to_dict(), sort_keys=False), encoding="utf-8")
            return self.commit_staged(staging, name, version)
        finally:
            self.discard_staged(staging)

    def staging_folder(self, label: str) -> Path:
        """A new empty folder inside the store, on the same file system, for building a model to commit.

        This process holds a lock on `<folder>.owner` while it lives: once it has gone (crashed, killed), the
        next import or `serve` sees the lock free and removes what it left (`sweep_staging`)."""
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_staging()
        folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self._tmp_dir))
        owner = FileLock(str(folder) + OWNER_SUFFIX)
        owner.acquire()
        _OWNED[str(folder)] = owner
        return folder

    def discard_staged(self, staging: Path) -> None:
        """Remove a staging folder that was not committed (a no-op after a commit), and its owner lock."""
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        _release_owner(staging)

    def commit_staged(self, staging: Path, name: str, version: str, *, overwrite: bool = False) -> Model:
        """Publish a complete staged model folder (model.yaml included): fsync, then rename into place under
        the name's lock, then move `latest`. Readers see the whole model or none of it."""
        fsync_tree(staging)
        with self._lock(name):
            target = self.models_dir / name / version
            if target.exists():
                if not overwrite:
                    raise ModelExistsError(f"model {name}:{version} already exists")
                trash = Path(tempfile.mkdtemp(prefix=f"replaced-{name}-", dir=self._tmp_dir))
                os.rename(target, trash / version)
                shutil.rmtree(trash, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)
            _release_owner(staging)
            fsync_dir(target.parent)
            self._point_latest(name)
        return Model.load(target)

    def delete(self, tag: str | Tag) -> Model:
        """Delete one version (`name:version`), or the newest one for a bare name; `latest` moves back."""
        model = self.get(tag)
        with self._lock(model.name):
            trash = Path(tempfile.mkdtemp(prefix=f"deleted-{model.name}-", dir=self._tmp_dir))
            os.rename(model.path, trash / model.version)  # disappears from listings atomically
            self._point_latest(model.name)
            shutil.rmtree(trash, ignore_errors=True)
        return model

    def _point_latest(self, name: str) -> None:
        folder = self.models_dir / name
        versions = self._versions(name)
        pointer = folder / LATEST
        if versions:
            atomic_write_text(pointer, versions[-1] + "\n")
        else:
            pointer.unlink(missing_ok=True)
            with _suppress(OSError):
                folder.rmdir()

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self._locks_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self._locks_dir / f"{name}.lock")):
            yield

    def sweep_staging(self) -> int:
        """Remove what crashed writers left in `.tmp`: staging folders whose owner lock no live process holds
        (and, for folders without one, those untouched for an hour). Returns how many entries went."""
        if not self._tmp_dir.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in list(self._tmp_dir.iterdir()):
            if entry.name.endswith(OWNER_SUFFIX) or str(entry) in _OWNED:
                continue
            owner = Path(str(entry) + OWNER_SUFFIX)
            with _suppress(OSError):
                if owner.exists():
                    lock = FileLock(str(owner), timeout=0)
                    try:
                        lock.acquire()
                    except Timeout:
                        continue  # a live writer is still building it
                    try:
                        shutil.rmtree(entry)
                        owner.unlink()
                    finally:
                        lock.release()
                    removed += 1
                elif entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry)
                    removed += 1
        for owner in self._tmp_dir.glob("*" + OWNER_SUFFIX):  # a lock whose folder was committed or removed
            folder = owner.name[: -len(OWNER_SUFFIX)]
            if not (self._tmp_dir / folder).exists() and str(self._tmp_dir / folder) not in _OWNED:
                with _suppress(OSError):
                    owner.unlink()
        return removed


@contextmanager
def _suppress(*errors: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except errors:
        pass


def _stored_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Load options to record in model.yaml: storable keys only, valid values (else the import fails, saying why)."""
    refused = sorted(set(options) - set(STORED_KEYS))
    if refused:
        raise StoreError(f"not a stored option: {', '.join(refused)}; the stored options are {', '.join(STORED_KEYS)}")
    return {key: value.__name__ if isinstance(value, type) else value for key, value in check_stored(options).items()}


def _stored_class(folder: Path, pipeline_class: str | type | None) -> type:
    """The diffusers class a folder is stored as: the importer's choice, else model_index.json's.

    It must be a class of diffusers itself: model.yaml records its name, and serving looks it up there again
    (custom classes come with their code: --custom-pipeline).
    """
    import diffusers

    if pipeline_class is None:
        index = folder / "model_index.json"
        try:
            pipeline_class = str(json.loads(index.read_text(encoding="utf-8"))["_class_name"])
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(
                f"{folder} is not a diffusers pipeline folder: cannot read model_index.json ({exc})"
            ) from exc
    cls = resolve_pipeline_class(pipeline_class)
    if getattr(diffusers, cls.__name__, None) is not cls:
        raise StoreError(
            f"pipeline class {cls.__module__}.{cls.__name__} is not part of diffusers; "
            "import its code with --custom-pipeline FILE.py --trust-remote-code"
        )
    return cls


def _release_owner(staging: Path) -> None:
    """The staging folder is published (or gone): its owner lock is no longer needed."""
    owner = _OWNED.pop(str(staging), None)
    if owner is not None:
        owner.release()
        with _suppress(OSError):
            os.unlink(str(staging) + OWNER_SUFFIX)
