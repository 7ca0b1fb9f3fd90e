"""Every ErrorInfo reason the server can send is in the documented set, and OPERATIONS.md lists each one."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import batching
import model_store
from service import errors

ROOT = Path(__file__).resolve().parents[2]


def reason_and_retry(exc: BaseException) -> tuple[str, bool]:
    detail = errors.status_for(exc)
    rich = rpc_status.from_call(_Call(detail))
    info = error_details_pb2.ErrorInfo()
    found = [d for d in rich.details if d.Unpack(info)]
    assert len(found) == 1 and info.domain == errors.DOMAIN
    retry = any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in rich.details)
    return info.reason, retry


class _Call:
    """What `rpc_status.from_call` reads of a finished call, from a built status."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple:
        return tuple(self._status.trailing_metadata)


def test_every_error_the_server_reports_has_a_documented_reason():
    cases = {
        errors.InvalidArgument("x"): ("INVALID_ARGUMENT", False),
        errors.NotFound("x"): ("MODEL_NOT_FOUND", False),
        errors.Unimplemented("x"): ("TASK_NOT_SERVED", False),
        errors.Unavailable("x"): ("DRAINING", True),
        errors.ReplyTooLarge("x"): ("REPLY_TOO_LARGE", False),
        errors.Unauthenticated("x"): ("UNAUTHENTICATED", False),
        model_store.ModelNotFoundError("x"): ("MODEL_NOT_FOUND", False),
        model_store.InvalidTagError("x"): ("INVALID_ARGUMENT", False),
        batching.QueueFullError("x"): ("QUEUE_FULL", True),
        batching.OutOfMemoryError("x"): ("OUT_OF_MEMORY", False),
        batching.DeadlineExceededError("x"): ("DEADLINE_EXCEEDED", False),
        batching.ItemCancelledError("x"): ("CANCELLED", False),
        batching.WorkerUnavailableError("x"): ("WORKER_UNAVAILABLE", True),
        batching.InvalidInputError("x"): ("PIPELINE_REFUSED_INPUT", False),
        RuntimeError("a bug"): ("INTERNAL", False),
    }
    for exc, expected in cases.items():
        assert reason_and_retry(exc) == expected, type(exc).__name__
        assert expected[0] in errors.REASONS


def test_operations_md_documents_every_reason():
    operations = (ROOT / "OPERATIONS.md").read_text(encoding="utf-8")
    missing = [reason for reason in errors.REASONS if f"| `{reason}` |" not in operations]
    assert not missing, missing
