"""Batching: work items, batch keys, the bounded queue, the policy and the per-device executor.

Knows nothing of gRPC, protobuf, torch or diffusers: the pipelines sit behind the small `Backend` (request
batches) and `StepBackend` (step-level batching) interfaces, implemented in `pipelines/`.
"""

from .errors import (
    BatchingError,
    DeadlineExceededError,
    InvalidInputError,
    ItemCancelledError,
    OutOfMemoryError,
    QueueFullError,
    ResultMismatchError,
    WorkerUnavailableError,
)
from .executor import Backend, BackendFactory, BatchReport, Executor, StepBackend, StepHook, Tick
from .items import BatchKey, Frozen, ProgressCallback, StepEvent, WorkItem, WorkKind
from .queue import BatchQueue
from .results import CallOutput, ItemOutput

__all__ = [
    "Backend",
    "BackendFactory",
    "BatchKey",
    "BatchQueue",
    "BatchReport",
    "BatchingError",
    "CallOutput",
    "DeadlineExceededError",
    "Executor",
    "Frozen",
    "InvalidInputError",
    "ItemCancelledError",
    "ItemOutput",
    "OutOfMemoryError",
    "ProgressCallback",
    "QueueFullError",
    "ResultMismatchError",
    "StepBackend",
    "StepEvent",
    "StepHook",
    "Tick",
    "WorkItem",
    "WorkKind",
    "WorkerUnavailableError",
]
