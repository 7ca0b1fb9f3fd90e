"""`diffusers-grpc health`: a probe. Exit 0 when SERVING, 1 when not, 2 when the server cannot be reached."""

from __future__ import annotations

import argparse
import sys
from typing import Any

SERVING, NOT_SERVING, UNREACHABLE = 0, 1, 2


def register(commands: Any) -> None:
    parser = commands.add_parser("health", help="check a server's health (for probes)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--target", default="localhost:50051", help="HOST:PORT (default localhost:50051)")
    where.add_argument("--uds", help="Unix socket path")
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

    target = f"unix:{args.uds}" if args.uds else args.target
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
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
