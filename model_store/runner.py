"""Runners (`Model.to_runner()`): one callable per declared signature of a loaded pipeline, returning plain
tuples.

Tasks a pipeline lacks as methods (`img2img`, `inpaint`, `text2img`) are derived with `from_pipe`
(`interface.derive`), which shares the weights instead of loading a second copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import interface
from .signatures import Signature

if TYPE_CHECKING:
    from .model import Model


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
        if interface.accepts(self.function, "return_dict"):
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
        return SignatureRunner(sig, interface.derive(base, sig.task), "__call__")
