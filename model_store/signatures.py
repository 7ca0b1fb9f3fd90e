"""Signatures: which pipeline methods a model serves, whether each batches, and the task each performs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidSignatureError

TEXT2IMG, IMG2IMG, INPAINT, OTHER = "text2img", "img2img", "inpaint", "other"
TASKS = (TEXT2IMG, IMG2IMG, INPAINT, OTHER)
# Task names that may be declared on a text-to-image pipeline lacking them: they are derived with from_pipe.
DERIVABLE_TASKS = (TEXT2IMG, IMG2IMG, INPAINT)
DEFAULT_SIGNATURES: Mapping[str, Mapping[str, Any]] = {"__call__": {"batchable": False}}
_KEYS = {"batchable": bool, "batch_dim": int}


@dataclass(frozen=True)
class Signature:
    """One servable pipeline method."""

    name: str
    batchable: bool = False
    batch_dim: int = 0
    task: str = OTHER

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        return data


def pipeline_task(class_name: str) -> str:
    """The task a pipeline class's `__call__` performs, judged by diffusers' naming convention."""
    lowered = class_name.lower()
    if "inpaint" in lowered:
        return INPAINT
    if "img2img" in lowered or "image2image" in lowered:
        return IMG2IMG
    if "pipeline" in lowered and not any(word in lowered for word in ("upscale", "depth2img", "video", "audio")):
        return TEXT2IMG
    return OTHER


def parse_signatures(
    declared: Mapping[str, Any] | None, pipeline_class: type | None, class_name: str | None = None
) -> dict[str, Signature]:
    """Validate declared signatures against the pipeline class and resolve the task of each.

    `pipeline_class` None skips the method-existence check (the class is unknown until a custom pipeline is
    trusted and loaded); `class_name` then decides the `__call__` task.
    """
    declared = DEFAULT_SIGNATURES if declared is None else declared
    if not isinstance(declared, Mapping) or not declared:
        raise InvalidSignatureError("signatures must be a non-empty mapping of method name to options")
    class_name = class_name or (pipeline_class.__name__ if pipeline_class else "")
    call_task = pipeline_task(class_name)
    result: dict[str, Signature] = {}
    for method, options in declared.items():
        if isinstance(options, Signature):
            options = options.to_dict()
        if options is None:
            options = {}
        if not isinstance(method, str) or not method.isidentifier():
            raise InvalidSignatureError(f"signature name {method!r} is not a Python method name")
        if not isinstance(options, Mapping):
            raise InvalidSignatureError(
                f"signature {method!r}: options must be a mapping, got {type(options).__name__}"
            )
        unknown = sorted(set(options) - set(_KEYS) - {"task"})
        if unknown:
            raise InvalidSignatureError(
                f"signature {method!r}: unknown option(s) {', '.join(unknown)}; allowed: batchable, batch_dim"
            )
        for key, kind in _KEYS.items():
            if key in options and type(options[key]) is not kind:
                raise InvalidSignatureError(
                    f"signature {method!r}: {key} must be {kind.__name__}, got {type(options[key]).__name__}"
                )
        task = _task_of(method, call_task, pipeline_class, class_name)
        result[method] = Signature(
            name=method,
            batchable=options.get("batchable", False),
            batch_dim=options.get("batch_dim", 0),
            task=task,
        )
    return result


def _task_of(method: str, call_task: str, pipeline_class: type | None, class_name: str) -> str:
    has_method = pipeline_class is None or callable(getattr(pipeline_class, method, None))
    if method == "__call__":
        return call_task
    if method in DERIVABLE_TASKS:
        if has_method or call_task in (TEXT2IMG, method):
            return method
        raise InvalidSignatureError(
            f"signature {method!r}: {class_name} has no method {method!r} and its __call__ is {call_task}, "
            "so the task cannot be derived with from_pipe"
        )
    if not has_method:
        raise InvalidSignatureError(f"signature {method!r}: {class_name} has no method {method!r}")
    return OTHER
