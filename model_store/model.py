"""A stored model: its recorded info (model.yaml), loading options, and loading into a pipeline or a runner."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import IntegrityError, StoreError, UntrustedCodeError
from .options import LoadOptions, scheduler_class
from .options import check as check_options
from .signatures import Signature

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger(__name__)
MODEL_FILE = "model.yaml"
FORMAT_VERSION = 1
PIPELINE = "pipeline"


@dataclass(frozen=True)
class ModelInfo:
    """What model.yaml records about a stored model."""

    name: str
    version: str
    created: str
    pipeline_class: str
    diffusers_version: str
    torch_version: str
    signatures: Mapping[str, Signature]
    options: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    kind: str = PIPELINE  # "pipeline", or an adapter: "lora", "embedding"
    adapter: Mapping[str, Any] = field(default_factory=dict)  # adapters: base (model name), weights (file), token

    @property
    def is_adapter(self) -> bool:
        return self.kind != PIPELINE

    @property
    def has_custom_code(self) -> bool:
        """Whether the model was imported with custom pipeline code (which needs the operator's trust)."""
        return bool(self.options.get("custom_pipeline"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "pipeline_class": self.pipeline_class,
            "diffusers_version": self.diffusers_version,
            "torch_version": self.torch_version,
            "signatures": {name: sig.to_dict() for name, sig in self.signatures.items()},
            "options": dict(self.options),
            "labels": dict(self.labels),
            "metadata": dict(self.metadata),
            "files": {name: dict(entry) for name, entry in self.files.items()},
            "kind": self.kind,
            **({"adapter": dict(self.adapter)} if self.is_adapter else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        signatures = {name: Signature.from_dict(name, sig) for name, sig in (data.get("signatures") or {}).items()}
        return cls(
            name=data["name"],
            version=data["version"],
            created=data["created"],
            pipeline_class=data["pipeline_class"],
            diffusers_version=data.get("diffusers_version", ""),
            torch_version=data.get("torch_version", ""),
            signatures=signatures,
            options=data.get("options") or {},
            labels=data.get("labels") or {},
            metadata=data.get("metadata") or {},
            files=data.get("files") or {},
            kind=str(data.get("kind", PIPELINE)),
            adapter=data.get("adapter") or {},
        )


@dataclass(frozen=True)
class Model:
    """A model in the store: `name:version`, its folder, its info, and how to load it."""

    path: Path
    info: ModelInfo
    options: LoadOptions = field(default_factory=LoadOptions)

    @classmethod
    def load(cls, folder: Path) -> Model:
        try:
            data = yaml.safe_load((folder / MODEL_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise StoreError(f"cannot read {folder / MODEL_FILE}: {exc}") from exc
        model = cls(path=folder, info=ModelInfo.from_dict(data))
        model.check_files(full=False)
        return model

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def tag(self) -> str:
        return f"{self.info.name}:{self.info.version}"

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self.info.signatures

    def with_options(self, **options: Any) -> Model:
        """A copy of this model that loads with the given options (see `model_store.options.LoadOptions`); they
        win over the options stored with the model."""
        from .custom import require_trust

        merged = dataclasses.replace(self.options, **check_options(options))
        require_trust(merged.custom_pipeline, merged.trust_remote_code)
        return dataclasses.replace(self, options=merged)

    def effective_options(self) -> LoadOptions:
        """The options a load uses: the operator's, then those stored at import (model.yaml), then defaults."""
        return self.options.merged_with(self.info.options)

    def pipeline_type(self) -> type:
        """The pipeline class this model loads as (custom code is imported only when trusted)."""
        if self.info.is_adapter:
            base = self.info.adapter.get("base")
            raise StoreError(f"{self.tag} is a {self.info.kind} adapter, not a pipeline: serve its base model {base}")
        from .custom import STORED_NAME as CUSTOM_FILE
        from .custom import load_class, require_trust, source_file, stored_file

        opts = self.options
        if opts.custom_pipeline:
            require_trust(opts.custom_pipeline, opts.trust_remote_code)
            return load_class(source_file(opts.custom_pipeline))
        if opts.pipeline_class:  # the operator's choice, in code or on the command line
            return resolve_pipeline_class(opts.pipeline_class)
        if self.info.has_custom_code:
            # Trust comes from the operator at load time, never from model.yaml; the code is always the
            # model's own pipeline.py, checked against its sha256, whatever path model.yaml names.
            if not opts.trust_remote_code:
                raise UntrustedCodeError(
                    f"{self.tag} ships custom pipeline code ({CUSTOM_FILE}); it runs only when the operator "
                    "trusts it: serve --trust-remote-code (Python: with_options(trust_remote_code=True))"
                )
            return load_class(stored_file(self.path, self.info.files, self.tag), self.info.pipeline_class)
        # model.yaml names a diffusers class; it never makes us import a module of its choosing.
        return resolve_pipeline_class(self.info.pipeline_class, diffusers_only=True)

    def check_files(self, *, full: bool) -> None:
        """Check every recorded file exists with its size; `full` also re-hashes it (slow for big models)."""
        from .files import sha256_file

        for rel, entry in self.info.files.items():
            path = self.path / rel
            try:
                found = os.lstat(path)
            except FileNotFoundError:
                raise IntegrityError(f"{self.tag}: file {rel} is missing") from None
            if not stat.S_ISREG(found.st_mode):  # a FIFO would block the hash, a link could point anywhere
                raise IntegrityError(f"{self.tag}: file {rel} is not a regular file")
            size = found.st_size
            if size != entry.get("size", size):
                raise IntegrityError(f"{self.tag}: file {rel} has size {size}, expected {entry['size']}")
            if full and sha256_file(path) != entry["sha256"]:
                raise IntegrityError(f"{self.tag}: file {rel} does not match its sha256")

    def load_pipeline(self, device: str | None = None) -> Any:
        """Load the stored pipeline with this model's options, on `device` (default: the option, else cpu)."""
        import torch

        os.environ.setdefault("DIFFUSERS_DISABLE_REMOTE_CODE", "1")  # never fetch code while loading
        opts = self.effective_options()
        pipeline_cls: Any = self.pipeline_type()
        # safetensors only, unless the user opted in to pickled weights
        kwargs: dict[str, Any] = {} if opts.allow_pickle else {"use_safetensors": True}
        if opts.torch_dtype:
            kwargs["dtype"] = getattr(torch, opts.torch_dtype)  # diffusers 0.42's name; `torch_dtype` is deprecated
        if opts.variant:
            kwargs["variant"] = opts.variant
        pipeline = pipeline_cls.from_pretrained(self.path, **kwargs)
        if opts.scheduler:
            scheduler: Any = scheduler_class(opts.scheduler)
            pipeline.scheduler = scheduler.from_config(pipeline.scheduler.config)
        target = device or opts.device or "cpu"
        offload = opts.cpu_offload or "none"
        if offload != "none" and not target.startswith("cuda"):
            log.warning("%s: cpu_offload=%s needs a CUDA device; loading on %s as it is", self.tag, offload, target)
            offload = "none"
        if offload == "model":
            pipeline.enable_model_cpu_offload(device=target)
        elif offload == "sequential":
            pipeline.enable_sequential_cpu_offload(device=target)
        else:
            pipeline.to(target)
        if opts.attention_slicing:
            pipeline.enable_attention_slicing()
        if opts.vae_slicing:
            pipeline.vae.enable_slicing()
        if opts.vae_tiling:
            pipeline.vae.enable_tiling()
        if opts.compile:
            compile_denoiser(pipeline, target)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def to_runner(self, device: str | None = None) -> Runner:
        """Load the pipeline and return a runner with one callable per signature."""
        from .runner import Runner

        return Runner(self, self.load_pipeline(device))


def compile_denoiser(pipeline: Any, device: str) -> None:
    """torch.compile the pipeline's denoiser (UNet or transformer) in place; CUDA only (on the CPU it costs minutes
    of compilation for little gain, so it is refused). The first calls at each new shape compile: warm up."""
    if not device.startswith("cuda"):
        raise StoreError(f"compile needs a CUDA device, not {device}")
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if denoiser is None:
        raise StoreError(f"{type(pipeline).__name__} has no unet or transformer to compile")
    denoiser.compile(dynamic=True)  # batch rows vary from call to call: one graph for every batch size


def resolve_pipeline_class(spec: str | type, *, diffusers_only: bool = False) -> type:
    """A pipeline class from a class, a diffusers class name, or (unless `diffusers_only`) a dotted path.

    Fails naming the class, rather than falling back to a generic pipeline that would load something else.
    """
    import importlib

    import diffusers

    if isinstance(spec, type):
        return spec
    module_name, _, name = spec.rpartition(".")
    if module_name and not diffusers_only:
        try:
            found = getattr(importlib.import_module(module_name), name, None)
        except ImportError as exc:
            raise StoreError(f"pipeline class {spec!r} cannot be imported: {exc}") from None
    else:
        found = getattr(diffusers, name, None)
    if not isinstance(found, type) or not issubclass(found, diffusers.DiffusionPipeline):
        where = "diffusers" if not module_name or diffusers_only else module_name
        raise StoreError(f"pipeline class {spec!r} is not a DiffusionPipeline class in {where}")
    return found
