"""One small exception hierarchy, mapped to gRPC status codes in one place.

Handlers raise `ServiceError`s (or let store/batching errors through); `status_for` turns any exception into a
code, a message and details (AIP-193): always a `google.rpc.ErrorInfo` (domain `diffusion.v1`, a stable `reason`
from `REASONS`, and metadata naming the model or signature where there is one), a `google.rpc.BadRequest` for
invalid fields, and a `google.rpc.RetryInfo` where trying again later is the answer (queue full, draining). Unknown
exceptions become INTERNAL with a generic message, and their traceback goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import batching
import model_store

log = logging.getLogger(__name__)

DOMAIN = "diffusion.v1"
# ErrorInfo.reason: a contract (OPERATIONS.md lists them); a client may branch on these, never on messages.
REASONS = {
    "INVALID_ARGUMENT": "a request field is invalid; BadRequest names each one",
    "PIPELINE_REFUSED_INPUT": "the pipeline refused the request's values (or its latents became non-finite)",
    "MODEL_NOT_FOUND": "no served model has the tag (metadata: model)",
    "TASK_NOT_SERVED": "the model has no signature for the RPC's task (metadata: model, task)",
    "SIGNATURE_NOT_FOUND": "Call named a signature the model does not have (metadata: model, signature)",
    "QUEUE_FULL": "the queue, or this client's share of it, is full; RetryInfo says when to retry",
    "OUT_OF_MEMORY": "the device ran out of memory even for this request alone",
    "REPLY_TOO_LARGE": "the reply would not fit the server's message limit",
    "DEADLINE_EXCEEDED": "the request's deadline passed before its images were done",
    "CANCELLED": "the client cancelled the request",
    "DRAINING": "the server is not ready or is shutting down; RetryInfo says when to retry (elsewhere)",
    "WORKER_UNAVAILABLE": "no live worker could take the request; RetryInfo says when to retry",
    "UNAUTHENTICATED": "the bearer token is missing or wrong",
    "AUTH_RATE_LIMITED": "too many failed authentications from this address; RetryInfo says when to retry",
    "TOO_MANY_WATCHES": "this address holds the most health Watch streams allowed",
    "INTERNAL": "a bug in the server: operators page on it; the server log has the traceback",
}
RETRY_DELAY_SECONDS = 1  # what RetryInfo suggests: the queue moves at the pace of a denoising step or a call
RETRYABLE = frozenset({"QUEUE_FULL", "DRAINING", "WORKER_UNAVAILABLE", "AUTH_RATE_LIMITED"})


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """An error with a gRPC status code, a stable reason and a message safe to show the client; `metadata`
    names what it is about (model, signature) for `ErrorInfo`."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {summary}", violations)


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "TASK_NOT_SERVED"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DRAINING"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class Refused(ServiceError):
    """A per-address limit of the security layer (failed authentications, health watches)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ReplyTooLarge(ServiceError):
    """The reply would not fit the server's message limit: said before the work, from the sizes asked for."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REPLY_TOO_LARGE"


_BATCHING_CODES: dict[type[BaseException], tuple[grpc.StatusCode, str]] = {
    batching.QueueFullError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
    batching.OutOfMemoryError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
    batching.DeadlineExceededError: (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    batching.ItemCancelledError: (grpc.StatusCode.CANCELLED, "CANCELLED"),
    batching.WorkerUnavailableError: (grpc.StatusCode.UNAVAILABLE, "WORKER_UNAVAILABLE"),
    batching.InvalidInputError: (grpc.StatusCode.INVALID_ARGUMENT, "PIPELINE_REFUSED_INPUT"),
}


# Error trailers must fit a client's default metadata limit (8 KiB) with room to spare, whatever a request held:
# messages are cut, and so are the violations listed.
MAX_MESSAGE = 512
MAX_FIELD, MAX_DESCRIPTION, MAX_VIOLATIONS = 96, 160, 8


@dataclass(frozen=True)
class Classified:
    """What an exception tells a client, whichever door it came in by: gRPC (`status_for`) or HTTP."""

    code: grpc.StatusCode
    reason: str
    message: str
    violations: Sequence[FieldViolation] = ()
    metadata: Mapping[str, str] | None = None


def status_for(exc: BaseException) -> grpc.Status:
    """The gRPC status (with rich details) that reports `exc` to the client."""
    found = classify(exc)
    detail = status_pb2.Status(code=_rpc_code(found.code), message=cut(found.message, MAX_MESSAGE))
    info = error_details_pb2.ErrorInfo(
        reason=found.reason,
        domain=DOMAIN,
        metadata={key: cut(value, MAX_FIELD) for key, value in (found.metadata or {}).items()},
    )
    _append(detail, info)
    if found.reason in RETRYABLE:
        _append(detail, error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_DELAY_SECONDS)))
    violations = found.violations
    if violations:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=cut(v.field, MAX_FIELD), description=cut(v.description, MAX_DESCRIPTION)
                )
                for v in violations[:MAX_VIOLATIONS]
            ]
        )
        _append(detail, request)
    return rpc_status.to_status(detail)


def _append(status: status_pb2.Status, message: object) -> None:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    status.details.append(packed)


def cut(text: str, limit: int) -> str:
    """At most `limit` characters, saying when it was cut."""
    return text if len(text) <= limit else text[: limit - 14] + "... (truncated)"


def classify(exc: BaseException) -> Classified:
    """The status, stable reason and safe message of `exc`; an unknown exception is INTERNAL, its traceback logged."""
    if isinstance(exc, ServiceError):
        return Classified(exc.code, exc.reason, exc.message, exc.violations, exc.metadata)
    if isinstance(exc, model_store.ModelNotFoundError):
        return Classified(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", str(exc))
    if isinstance(exc, model_store.InvalidTagError):
        return Classified(
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", str(exc), (FieldViolation("model", str(exc)),)
        )
    for kind, (code, reason) in _BATCHING_CODES.items():
        if isinstance(exc, kind):
            return Classified(code, reason, str(exc) or kind.__name__)
    log.error("internal error", exc_info=exc)
    return Classified(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; the server log has the details")


def _rpc_code(code: grpc.StatusCode) -> int:
    return int(code.value[0]) if isinstance(code.value, tuple) else int(code_pb2.INTERNAL)
