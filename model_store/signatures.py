"""Signatures: which pipeline methods a model serves, whether each batches, and the task each performs.

The task of each signature comes from the pipeline's interface (`model_store.interface`), or from the
importer's explicit `--task SIGNATURE=TASK`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import interface
from .errors import InvalidSignatureError
from .interface import CUSTOM, TYPED_TASKS

DEFAULT_SIGNATURES: Mapping[str, Mapping[str, Any]] = {"__call__": {"batchable": False}}
_KEYS = {"batchable": bool, "batch_dim": int}


@dataclass(frozen=True)
class Signature:
    """One servable pipeline method."""

    name: str
    batchable: bool = False
    batch_dim: int = 0
    task: str = CUSTOM

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Signature:
        task = interface.normalize_task(str(data.get("task", CUSTOM)))
        return cls(name, bool(data.get("batchable", False)), int(data.get("batch_dim", 0)), task)


def parse_signatures(
    declared: Mapping[str, Any] | None, pipeline_class: type, tasks: Mapping[str, str] | None = None
) -> dict[str, Signature]:
    """Validate declared signatures against the pipeline class and resolve the task of each.

    `tasks` overrides the derived task of named signatures (`--task SIGNATURE=TASK`).
    """
    declared = DEFAULT_SIGNATURES if declared is None else declared
    if not isinstance(declared, Mapping) or not declared:
        raise InvalidSignatureError("signatures must be a non-empty mapping of method name to options")
    tasks = dict(tasks or {})
    unknown_overrides = sorted(set(tasks) - set(declared))
    if unknown_overrides:
        raise InvalidSignatureError(f"--task names undeclared signature(s): {', '.join(unknown_overrides)}")
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
        result[method] = Signature(
            name=method,
            batchable=options.get("batchable", False),
            batch_dim=options.get("batch_dim", 0),
            task=_task_of(method, pipeline_class, tasks.get(method)),
        )
    return result


def _task_of(method: str, pipeline_class: type, declared: str | None) -> str:
    name = pipeline_class.__name__
    has_method = callable(getattr(pipeline_class, method, None))
    if not has_method and method not in TYPED_TASKS:
        raise InvalidSignatureError(f"signature {method!r}: {name} has no method {method!r}")
    if not has_method and interface.derived_class(pipeline_class, method) is None:
        raise InvalidSignatureError(
            f"signature {method!r}: {name} has no method {method!r} and diffusers has no {method} pipeline of its "
            "family to derive with from_pipe"
        )
    if declared is None:
        return interface.method_task(pipeline_class, method)
    try:
        task = interface.normalize_task(declared)
    except ValueError as exc:
        raise InvalidSignatureError(f"signature {method!r}: {exc}") from None
    if not has_method and task != method:
        raise InvalidSignatureError(f"signature {method!r} is derived with from_pipe: its task is {method}")
    return task
