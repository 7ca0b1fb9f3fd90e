"""Shared test helpers: free ports, a real server process, waiting for health, decoding images."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
READINESS = "diffusion.v1.DiffusionService"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(target: str, service: str = READINESS, timeout: float = 2.0) -> int | None:
    """The health status, or None when the server cannot be reached."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def wait_serving(target: str, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll readiness until SERVING (a probe does the same); fail early if the process died."""
    from service.client import wait_until_serving

    wait_until_serving(target, timeout, alive=None if process is None else lambda: process.poll() is None)


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "the condition") -> Any:
    """Poll `condition` until it returns something true, at most `timeout` seconds (for state another process
    holds, where no event can be shared); returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout}s")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


@contextlib.contextmanager
def server_process(home: Path, args: Sequence[str] = (), env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `diffusers-grpc serve` process on a free loopback port; yields its target once ready. It stops with
    no drain window (no balancer to wait for), unless `args` give one."""
    port = free_port()
    log = open(home / f"server-{port}.log", "wb")  # noqa: SIM115 (closed in finally, after the process)
    process = subprocess.Popen(
        cli("serve", "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", "0", *args),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process=process)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest details of an error."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else []:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            fields += [v.field for v in request.field_violations]
    return fields


def error_details(error: grpc.RpcError) -> tuple[Any, Any]:
    """The google.rpc.ErrorInfo and RetryInfo (None where absent) of an error's rich status."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    info = retry = None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return info, retry


def reason_of(error: grpc.RpcError) -> str:
    """ErrorInfo's reason, after checking its domain: every error status carries one."""
    info, _ = error_details(error)
    assert info is not None, f"{error.code()} carries no ErrorInfo"
    assert info.domain == "diffusion.v1"
    return str(info.reason)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)
