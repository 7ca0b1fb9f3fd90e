"""The models this server serves: tag resolution and which signature each typed RPC runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_store import Model, Signature, Tag
from model_store.model import PipelineDefaults, read_pipeline_defaults
from model_store.signatures import TEXT2IMG

from .errors import NotFound, Unimplemented


@dataclass(frozen=True)
class ServedModel:
    model: Model
    defaults: PipelineDefaults

    @classmethod
    def of(cls, model: Model) -> ServedModel:
        return cls(model, read_pipeline_defaults(model.path))

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
        rpc = {TEXT2IMG: "TextToImage", "img2img": "ImageToImage", "inpaint": "Inpaint"}.get(task, task)
        raise Unimplemented(f"model {self.tag} serves no {task} signature for {rpc}; its signatures: {names}")


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
