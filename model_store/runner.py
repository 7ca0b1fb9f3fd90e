"""Runners: one callable per declared signature of a loaded pipeline, returning plain tuples.

Tasks a text-to-image pipeline lacks (`img2img`, `inpaint`) are derived with `from_pipe`, which shares the
weights instead of loading a second copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .signatures import IMG2IMG, INPAINT, TEXT2IMG, Signature

if TYPE_CHECKING:
    from .model import Model

_AUTO_PIPELINES = {
    TEXT2IMG: "AutoPipelineForText2Image",
    IMG2IMG: "AutoPipelineForImage2Image",
    INPAINT: "AutoPipelineForInpainting",
}


class SignatureRunner:
    """Calls one signature. `pipeline` is the object whose method runs (a derived pipeline for derived tasks)."""

    def __init__(self, signature: Signature, pipeline: Any, method: str) -> None:
        self.signature = signature
        self.pipeline = pipeline
        self.method = method

    @property
    def function(self) -> Callable[..., Any]:
        return getattr(self.pipeline, self.method)

    def run(self, **kwargs: Any) -> tuple[Any, ...]:
        """Run the method; a `BaseOutput` is turned into a tuple so results can cross process boundaries."""
        if _accepts(self.function, "return_dict"):
            kwargs.setdefault("return_dict", False)
        result = self.function(**kwargs)
        if isinstance(result, tuple):
            return result
        to_tuple = getattr(result, "to_tuple", None)
        return tuple(to_tuple()) if callable(to_tuple) else (result,)

    async def async_run(self, **kwargs: Any) -> tuple[Any, ...]:
        return await asyncio.to_thread(lambda: self.run(**kwargs))


class Runner:
    """A loaded pipeline with one `SignatureRunner` attribute per declared signature."""

    def __init__(self, model: Model, pipeline: Any) -> None:
        self.model = model
        self.pipeline = pipeline
        self.signatures: Mapping[str, SignatureRunner] = {
            name: self._bind(sig) for name, sig in model.signatures.items()
        }

    def __getattr__(self, name: str) -> SignatureRunner:
        try:
            return self.__dict__["signatures"][name]
        except KeyError:
            raise AttributeError(f"{self.model.tag} has no signature {name!r}") from None

    def __getitem__(self, name: str) -> SignatureRunner:
        return self.signatures[name]

    def _bind(self, sig: Signature) -> SignatureRunner:
        base = self.pipeline
        if callable(getattr(base, sig.name, None)):
            return SignatureRunner(sig, base, sig.name)
        derived = derive_pipeline(base, sig.task)
        return SignatureRunner(sig, derived, "__call__")


def derive_pipeline(base: Any, task: str) -> Any:
    """A pipeline for `task` sharing `base`'s modules (the base itself when it already performs the task)."""
    import diffusers

    from .signatures import pipeline_task

    if pipeline_task(type(base).__name__) == task:
        return base
    auto = getattr(diffusers, _AUTO_PIPELINES[task])
    # Without dtype=base.dtype, from_pipe casts the shared modules (the base's too) to float32.
    derived = auto.from_pipe(base, dtype=base.dtype)
    derived.set_progress_bar_config(disable=True)
    return derived


def _accepts(function: Callable[..., Any], name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
