"""`diffusers-grpc health`: a probe. Exit 0 when SERVING, 1 when not, 2 when the server cannot be reached."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_connection_flags, connection

SERVING, NOT_SERVING, UNREACHABLE = 0, 1, 2


def register(commands: Any) -> None:
    parser = commands.add_parser("health", help="check a server's health (for probes)")
    add_connection_flags(parser)
    parser.add_argument(
        "--service",
        default="diffusion.v1.DiffusionService",
        help="health service name: '' is liveness, diffusion.v1.DiffusionService (default) is readiness",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    where = connection(args)
    channel = (
        grpc.secure_channel(where.target, where.credentials)
        if where.credentials is not None
        else grpc.insecure_channel(where.target)
    )
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=list(where.metadata.items()),
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                print(f"{args.service!r}: unknown service", file=sys.stderr)
                return NOT_SERVING
            print(f"unreachable: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return UNREACHABLE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING
