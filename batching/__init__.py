"""Batching: work items, batch keys, the bounded queue and the per-device executor.

Knows nothing of gRPC or protobuf; the pipeline itself sits behind the small `BatchRunner` interface.
"""

from .errors import (
    BatchingError,
    DeadlineExceededError,
    InvalidInputError,
    ItemCancelledError,
    OutOfMemoryError,
    QueueFullError,
    WorkerUnavailableError,
)
from .executor import BatchReport, BatchRunner, Executor, StepHook
from .items import BatchKey, StepEvent, WorkItem
from .queue import BatchQueue

__all__ = [
    "BatchKey",
    "BatchQueue",
    "BatchReport",
    "BatchRunner",
    "BatchingError",
    "DeadlineExceededError",
    "Executor",
    "InvalidInputError",
    "ItemCancelledError",
    "OutOfMemoryError",
    "QueueFullError",
    "StepEvent",
    "StepHook",
    "WorkItem",
    "WorkerUnavailableError",
]
