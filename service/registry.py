"""The models this server serves: tag resolution, which signature each typed RPC runs, and what a request may
pass to a signature (its Python parameters, its tokenizer's length)."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from model_store import Model, Signature, Tag
from model_store.model import PipelineDefaults, read_pipeline_defaults
from model_store.signatures import IMG2IMG, INPAINT, TEXT2IMG

from .errors import NotFound, Unimplemented

log = logging.getLogger(__name__)
_RPC_OF_TASK = {TEXT2IMG: "TextToImage", IMG2IMG: "ImageToImage", INPAINT: "Inpaint"}


@dataclass(frozen=True)
class ServedModel:
    model: Model
    defaults: PipelineDefaults
    tokenizer: Any = field(default=None, compare=False, repr=False)
    # Fast tokenizers fail with "Already borrowed" when two threads use one at once (validation runs on a pool).
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def of(cls, model: Model) -> ServedModel:
        model.pipeline_type()  # fails now, before any port opens, for an unknown class or untrusted code
        return cls(model, read_pipeline_defaults(model.path), _load_tokenizer(model))

    @property
    def tag(self) -> str:
        return self.model.tag

    def signature_for(self, task: str) -> Signature:
        """The signature a typed RPC runs: the one named after the task, else one whose task it is."""
        signatures = self.model.signatures
        if task in signatures:
            return signatures[task]
        if "__call__" in signatures and signatures["__call__"].task == task:
            return signatures["__call__"]
        for signature in signatures.values():
            if signature.task == task:
                return signature
        names = ", ".join(sorted(signatures))
        rpc = _RPC_OF_TASK.get(task, task)
        raise Unimplemented(f"model {self.tag} serves no {task} signature for {rpc}; its signatures: {names}")

    def parameters(self, signature: str) -> Mapping[str, inspect.Parameter] | None:
        """The keyword parameters of a signature's method; None when it takes any keyword (custom code)."""
        return _parameters(self.model.pipeline_type(), signature, self.model.signatures[signature].task)

    def prompt_warnings(self, *prompts: str) -> tuple[str, ...]:
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


@functools.lru_cache(maxsize=64)
def _parameters(cls: type, method: str, task: str) -> Mapping[str, inspect.Parameter] | None:
    class_name = cls.__name__
    function = getattr(cls, method, None)
    if function is None and task in (IMG2IMG, INPAINT, TEXT2IMG):
        try:
            from diffusers.pipelines import auto_pipeline

            mapping = {
                TEXT2IMG: auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
                IMG2IMG: auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
                INPAINT: auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
            }[task]
            function = auto_pipeline._get_task_class(mapping, class_name).__call__
        except Exception:
            return None
    if function is None:
        return None
    params = inspect.signature(function).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes_any and not getattr(function, "__module__", "").startswith("diffusers."):
        return None  # custom code that forwards **kwargs: let the pipeline judge
    # Only named parameters: diffusers' own `**kwargs` catch deprecated callbacks, never a client's arguments.
    return {name: p for name, p in params.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class ModelRegistry:
    """Resolves request tags to served models. The first model is the default for an empty tag."""

    def __init__(self, served: Sequence[ServedModel]) -> None:
        if not served:
            raise ValueError("a registry needs at least one model")
        self.models = list(served)

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
        raise NotFound(f"model {tag!r} is not served here; served: {served_tags}")
