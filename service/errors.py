"""One small exception hierarchy, mapped to gRPC status codes in one place.

Handlers raise `ServiceError`s (or let store/batching errors through); `status_for` turns any exception into a
code, a message and optional `google.rpc.BadRequest` details. Unknown exceptions become INTERNAL with a generic
message, and their traceback goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import batching
import model_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """An error with a gRPC status code and a message safe to show the client."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {summary}", violations)


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ReplyTooLarge(ServiceError):
    """The reply would not fit the server's message limit: said before the work, from the sizes asked for."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BATCHING_CODES: dict[type[BaseException], grpc.StatusCode] = {
    batching.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    batching.OutOfMemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    batching.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    batching.ItemCancelledError: grpc.StatusCode.CANCELLED,
    batching.WorkerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    batching.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
}


# Error trailers must fit a client's default metadata limit (8 KiB) with room to spare, whatever a request held:
# messages are cut, and so are the violations listed.
MAX_MESSAGE = 512
MAX_FIELD, MAX_DESCRIPTION, MAX_VIOLATIONS = 96, 160, 8


def status_for(exc: BaseException) -> grpc.Status:
    """The gRPC status (with rich details) that reports `exc` to the client."""
    code, message, violations = _classify(exc)
    detail = status_pb2.Status(code=_rpc_code(code), message=cut(message, MAX_MESSAGE))
    if violations:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=cut(v.field, MAX_FIELD), description=cut(v.description, MAX_DESCRIPTION)
                )
                for v in violations[:MAX_VIOLATIONS]
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(request)
        detail.details.append(packed)
    return rpc_status.to_status(detail)


def cut(text: str, limit: int) -> str:
    """At most `limit` characters, saying when it was cut."""
    return text if len(text) <= limit else text[: limit - 14] + "... (truncated)"


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str, Sequence[FieldViolation]]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.violations
    if isinstance(exc, model_store.ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), ()
    if isinstance(exc, model_store.InvalidTagError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), (FieldViolation("model", str(exc)),)
    for kind, code in _BATCHING_CODES.items():
        if isinstance(exc, kind):
            return code, str(exc) or kind.__name__, ()
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details", ()


def _rpc_code(code: grpc.StatusCode) -> int:
    return int(code.value[0]) if isinstance(code.value, tuple) else int(code_pb2.INTERNAL)
