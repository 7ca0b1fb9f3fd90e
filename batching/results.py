"""What a backend returns for each item, typed by the kind of work, and the check every path applies to it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ResultMismatchError
from .items import WorkItem, WorkKind


@dataclass(frozen=True)
class ItemOutput:
    """One item's image from a typed task (request or step engine)."""

    image: Any  # a PIL image (or an array, per output_type)
    nsfw: bool = False
    steps_computed: int | None = None  # with a feature cache: denoiser steps that ran in full
    steps_cached: int | None = None  # and those that reused the cache


@dataclass(frozen=True)
class CallOutput:
    """One item's share of a generic call's outputs, by name (`output_0`... when the method returns a tuple)."""

    values: Mapping[str, Any]


EXPECTED: Mapping[WorkKind, type] = {WorkKind.TASK: ItemOutput, WorkKind.STEP: ItemOutput, WorkKind.CALL: CallOutput}


def check_results(kind: WorkKind, items: Sequence[WorkItem], results: Sequence[Any]) -> None:
    """Raise ResultMismatchError unless there is one result of the kind's type per item."""
    if len(results) != len(items):
        raise ResultMismatchError(f"the backend returned {len(results)} results for {len(items)} items")
    expected = EXPECTED[kind]
    wrong = [type(r).__name__ for r in results if not isinstance(r, expected)]
    if wrong:
        raise ResultMismatchError(f"{kind.value} work must give {expected.__name__} results, got {', '.join(wrong)}")
