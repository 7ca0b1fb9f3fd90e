"""Why a work item did not produce a result. The service maps each to a gRPC status."""


class BatchingError(Exception):
    """Base class of executor errors."""


class QueueFullError(BatchingError):
    """The bounded queue cannot take the request's items."""


class DeadlineExceededError(BatchingError):
    """The item's deadline passed before it could run."""


class ItemCancelledError(BatchingError):
    """The item was cancelled by its caller."""


class WorkerUnavailableError(BatchingError):
    """No worker can run the item: the executor is shutting down or its workers died."""


class OutOfMemoryError(BatchingError):
    """The item does not fit in device memory even when run alone."""


class InvalidInputError(BatchingError):
    """The pipeline rejected the item's input (a ValueError or TypeError raised for this item alone)."""


class ResultMismatchError(BatchingError):
    """A backend returned results that do not fit its items (a bug in our code): exactly those items fail."""
