"""The models this server serves: tag resolution, which signature each typed RPC runs, and what a request may
pass to a signature (its parameters, from `model_store.interface`; its tokenizer's length)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from model_store import Model, ModelNotFoundError, ModelStore, Signature, Tag, interface
from model_store.defaults import PipelineDefaults, compatible_schedulers, read_pipeline_defaults
from model_store.interface import EDIT, IMG2IMG, INPAINT, TEXT2IMG, Parameters
from model_store.options import cache_threshold
from model_store.tags import shown
from pipelines.adapters import EMBEDDING, Adapter

from .errors import NotFound, Unimplemented

log = logging.getLogger(__name__)
_RPC_OF_TASK = {TEXT2IMG: "TextToImage", IMG2IMG: "ImageToImage", INPAINT: "Inpaint", EDIT: "Edit"}


class AdapterCatalog:
    """The adapters a served model may use, by name. Replaced whole when the store changes (the swap of one
    dict is atomic, so request threads read it without a lock)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Adapter] = {}
        self.version = 0  # changes with what is served: workers then unload what left

    def replace(self, adapters: Mapping[str, Adapter]) -> None:
        if adapters != self._by_name:
            self._by_name = dict(adapters)
            self.version += 1

    def snapshot(self) -> tuple[int, list[Adapter]]:
        """(version, adapters), read together: what a worker's replica reconciles against."""
        by_name = self._by_name
        return self.version, list(by_name.values())

    def get(self, name: str) -> Adapter | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def all(self) -> list[Adapter]:
        return list(self._by_name.values())

    def embeddings(self) -> list[Adapter]:
        return [a for a in self._by_name.values() if a.kind == EMBEDDING]


@dataclass(frozen=True)
class ServedModel:
    model: Model  # with the load options it is served with
    defaults: PipelineDefaults
    parameters: Mapping[str, Parameters | None] = field(default_factory=dict, compare=False, repr=False)
    engines: Mapping[str, str] = field(default_factory=dict, compare=False)  # signature -> "step" or "request"
    adapters: AdapterCatalog = field(default_factory=AdapterCatalog, compare=False, repr=False)
    tokenizer: Any = field(default=None, compare=False, repr=False)
    pipeline_class: Any = field(default=None, compare=False, repr=False)  # the stored pipeline's diffusers class
    # Fast tokenizers fail with "Already borrowed" when two threads use one at once (validation runs on a pool).
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def of(cls, model: Model, batching: str = "auto") -> ServedModel:
        """Resolve everything a request needs to know about a model with its load options, before any port opens:
        its class (an unknown one, or untrusted custom code, fails here), each signature's parameters and
        batching engine, the defaults its config files give."""
        pipeline_class = model.pipeline_type()
        parameters = {
            name: interface.signature_parameters(pipeline_class, name, sig.task)
            for name, sig in model.signatures.items()
        }
        engines = {name: _engine(batching, model, pipeline_class, sig) for name, sig in model.signatures.items()}
        defaults = read_pipeline_defaults(model.path)
        scheduler = model.effective_options().scheduler
        if scheduler is not None:  # the load options replace the stored scheduler
            name = scheduler if isinstance(scheduler, str) else scheduler.__name__
            defaults = dataclasses.replace(defaults, scheduler=name, compatible_schedulers=compatible_schedulers(name))
        tokenizer = _load_tokenizer(model)
        return cls(model, defaults, parameters, engines, tokenizer=tokenizer, pipeline_class=pipeline_class)

    @property
    def tag(self) -> str:
        return self.model.tag

    @property
    def dtype(self) -> str:
        return self.model.effective_options().torch_dtype or "float32"

    @property
    def control_inputs(self) -> int:
        return self.defaults.control_inputs

    def cacheable(self, signature: str) -> bool:
        """Whether the signature offers a First Block Cache: on the step engine, for the pipelines diffusers'
        own hook runs in (`pipelines.feature_cache.CACHEABLE_PIPELINES`)."""
        return signature in self._cacheable

    @functools.cached_property
    def _cacheable(self) -> frozenset[str]:
        from pipelines.feature_cache import CACHEABLE_PIPELINES

        found = set()
        for name, signature in self.model.signatures.items():
            task_class = _task_class(self.pipeline_class, signature)
            if (
                self.engines.get(name) == "step"
                and task_class is not None
                and task_class.__name__ in CACHEABLE_PIPELINES
            ):
                found.add(name)
        return frozenset(found)

    @functools.cached_property
    def default_cache_threshold(self) -> float | None:
        """The model's default First Block Cache threshold (`models import --option cache=...`), or None: read
        once, not per request."""
        option = self.model.effective_options().cache
        return cache_threshold(option) if option else None

    def control_parameter(self, signature: str) -> str | None:
        """The argument that takes the ControlNet conditioning images, or None when the model has no ControlNet."""
        if not self.control_inputs:
            return None
        params = self.parameters.get(signature) or {}
        return "control_image" if "control_image" in params else "image"

    def serves(self, task: str) -> bool:
        """Whether a typed request of this task has a signature to run (`signature_for` would find one)."""
        signatures = self.model.signatures
        return task in signatures or any(signature.task == task for signature in signatures.values())

    def signature_for(self, task: str) -> Signature:
        """The signature a typed RPC runs: the one named after the task, else `__call__`, else one whose task it
        is; UNIMPLEMENTED naming the signatures and their tasks when the model has none."""
        signatures = self.model.signatures
        if task in signatures:
            return signatures[task]
        if "__call__" in signatures and signatures["__call__"].task == task:
            return signatures["__call__"]
        for signature in signatures.values():
            if signature.task == task:
                return signature
        names = ", ".join(f"{s.name} ({s.task})" for s in signatures.values())
        rpc = _RPC_OF_TASK.get(task, task)
        raise Unimplemented(
            f"model {self.tag} serves no {task} signature for {rpc}; its signatures: {names}",
            metadata={"model": self.tag, "task": task},
        )

    def takes(self, signature: str) -> Callable[[str], bool]:
        """`takes(name)`: whether the signature's method accepts that argument (custom code forwarding
        `**kwargs` accepts anything)."""
        params = self.parameters.get(signature)
        return lambda name: params is None or name in params

    def default(self, signature: str, name: str, fallback: Any) -> Any:
        """An argument's default in the signature's own pipeline (the model's default), else `fallback`."""
        return interface.default_of(self.parameters.get(signature), name, fallback)

    def default_size(self, signature: str) -> tuple[int, int]:
        """(height, width) of an image the signature makes when a request gives no size: its `__call__`'s own
        default where the signature has one (AuraFlow, Kandinsky 3 and Sana say 1024), else what the pipeline
        derives from its configs (`PipelineDefaults`)."""
        height = self.default(signature, "height", None)
        width = self.default(signature, "width", None)
        if isinstance(height, int) and isinstance(width, int):
            return height, width
        return self.defaults.height, self.defaults.width

    def takes_several_images(self, signature: str) -> bool:
        """Whether an edit signature's pipeline is made for several reference images."""
        method = self.model.signatures[signature].name
        cls = self.pipeline_class if method == "__call__" else None
        return cls is not None and cls.__name__ in interface.SEVERAL_IMAGES

    def main_signature(self) -> str:
        """The signature whose defaults describe the model: its text-to-image one, else its first."""
        signatures = self.model.signatures
        return next((s.name for s in signatures.values() if s.task == TEXT2IMG), next(iter(signatures), "__call__"))

    def prompt_warnings(self, *prompts: str | None) -> tuple[str, ...]:
        """Say when a prompt is longer than the text encoder reads (diffusers truncates it silently)."""
        if self.tokenizer is None:
            return ()
        limit = int(self.tokenizer.model_max_length)
        warnings = []
        for name, prompt in zip(("prompt", "negative_prompt"), prompts):
            if not prompt:
                continue
            with self._tokenizer_lock:
                count = len(self.tokenizer(prompt, truncation=False).input_ids)
            if count > limit:
                warnings.append(f"{name} is {count} tokens; the text encoder reads the first {limit}, ignores the rest")
        return tuple(warnings)


def _task_class(pipeline_class: type, signature: Signature) -> type | None:
    """The pipeline class a signature runs: the stored one for `__call__`, the derived one for a task of it, or
    None for a method of its own (custom code nobody can see into)."""
    if signature.name == "__call__":
        return pipeline_class
    if getattr(pipeline_class, signature.name, None) is None:
        return interface.derived_class(pipeline_class, signature.task)
    return None


def _engine(batching: str, model: Model, pipeline_class: type, signature: Signature) -> str:
    """Step-level batching where the step engine reproduces the signature exactly (and, under `auto`, where the
    importer declared it batchable); request batching everywhere else: the engine never stops a model serving."""
    from pipelines.families import step_capable

    if batching == "request" or signature.task not in interface.TYPED_TASKS:
        return "request"
    if batching == "auto" and not signature.batchable:
        return "request"
    if (model.effective_options().cpu_offload or "none") != "none":
        return "request"  # offload hooks move modules per pipeline call; the step engine calls them directly
    if step_capable(pipeline_class, _task_class(pipeline_class, signature), model.path):
        return "step"
    if batching == "step":
        log.warning("%s: %s stays on request batching (the step engine does not support it)", model.tag, signature.name)
    return "request"


def resolve_dtype(flag: str, model: Model, device: str) -> str:
    """The dtype a model runs in: the operator's flag, else the option stored with the model, else `auto`:
    float16 on CUDA (bfloat16 where the model's config asks for it), float32 on the CPU."""
    if flag != "auto":
        return flag
    stored = model.effective_options().torch_dtype
    if stored:
        return stored
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if read_pipeline_defaults(model.path).prefers_bfloat16 else "float16"


def _load_tokenizer(model: Model) -> Any:
    folder = model.path / "tokenizer"
    if not folder.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a model without a usable tokenizer still serves; it just gets no warnings
        log.warning("%s: cannot load the tokenizer for prompt checks: %s", model.tag, exc)
        return None


class ModelRegistry:
    """Resolves request tags to served models. The first model is the default for an empty tag."""

    def __init__(self, served: Sequence[ServedModel]) -> None:
        if not served:
            raise ValueError("a registry needs at least one model")
        self.models = list(served)
        self.other_bases: dict[str, str] = {}  # adapters stored for models not served here: name -> base
        self._checked: dict[str, str | None] = {}  # adapter tag -> its problem (None: fine), checked once

    def refresh_adapters(
        self, store: ModelStore, only: Sequence[str] | None = None, allow_pickle: bool = False
    ) -> None:
        """Read the store's adapters: each served model gets those of its name (or of `only`), so one added,
        replaced or deleted while the server runs is seen at the next refresh. Each is held to the store's rules
        again (`adapter_problem`), whatever its origin: a bad entry is left out with one warning, never a stop.
        Cost: one pass over the store, a hash of each adapter new since the last refresh."""
        from model_store.adapters import adapter_problem, weights_path

        served_names = {served.model.name for served in self.models}
        by_base: dict[str, dict[str, Adapter]] = {name: {} for name in served_names}
        others = {}
        checked: dict[str, str | None] = {}
        models, broken = store.scan()
        for folder, why in broken:
            key = str(folder)
            if key not in self._checked:
                log.warning("store entry %s/%s is unreadable and not served: %s", folder.parent.name, folder.name, why)
            checked[key] = why
        for model in models:  # oldest first: the newest version of a name wins
            if not model.info.is_adapter or (only is not None and model.name not in only):
                continue
            base = str(model.info.adapter.get("base", ""))
            if base not in served_names:
                others[model.name] = base
                continue
            problem = self._checked.get(model.tag, "unchecked")
            if problem == "unchecked":
                problem = adapter_problem(model, allow_pickle=allow_pickle)
                if problem is not None:
                    log.warning("adapter %s is not served: %s", model.tag, problem)
            checked[model.tag] = problem
            if problem is not None:
                by_base[base].pop(model.name, None)  # an older good version is not served in its place either
                continue
            token = model.info.adapter.get("token")
            by_base[base][model.name] = Adapter(model.name, model.info.kind, str(weights_path(model)), token=token)
        self._checked = checked
        for served in self.models:
            served.adapters.replace(by_base[served.model.name])
        self.other_bases = others
        missing = sorted(set(only or ()) - {name for names in by_base.values() for name in names})
        if missing:
            where = {name: others.get(name) for name in missing}
            said = ", ".join(
                f"{name} (base {base})" if base else f"{name} (not in the store)" for name, base in where.items()
            )
            raise ModelNotFoundError(f"--adapters names adapters no served model has: {said}")

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def resolve(self, tag: str) -> ServedModel:
        if not tag:
            return self.default
        parsed = Tag.parse(tag)
        for served in self.models:
            if served.model.name == parsed.name and (
                parsed.version is None or served.model.version.startswith(parsed.version)
            ):
                return served
        served_tags = ", ".join(m.tag for m in self.models)
        raise NotFound(f"model {shown(tag)} is not served here; served: {served_tags}", metadata={"model": tag})
