"""Helpers shared by the CLI commands."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A user-facing error: printed without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


TOKEN_ENV = "DIFFUSERS_GRPC_TOKEN"


def add_connection_flags(parser: Any) -> None:
    """How a client command reaches a server: TCP or a Unix socket, plaintext or TLS (mTLS), with a token."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--target", default="localhost:50051", help="HOST:PORT (default localhost:50051)")
    where.add_argument("--uds", help="Unix socket path (instead of --target)")
    parser.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS, verifying the server against it")
    parser.add_argument("--tls-cert", help="PEM client certificate, for a server that requires mTLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--token", default=None, help=f"bearer token for a server run with --auth-token (env {TOKEN_ENV})"
    )


@dataclass(frozen=True)
class Connection:
    """A checked set of connection flags: the channel target, its credentials, and call metadata."""

    target: str
    credentials: Any  # grpc.ChannelCredentials, or None for plaintext
    metadata: dict[str, str]


def connection(args: Any) -> Connection:
    """Read the connection flags; a missing file or a half-given key pair is a usage error (exit 2)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together", exit_code=2)
    if args.tls_cert and not args.tls_ca:
        raise CliError("--tls-cert needs --tls-ca (client certificates are sent over TLS)", exit_code=2)
    credentials = None
    if args.tls_ca:
        import grpc

        ca, cert, key = (_read_pem(flag, path) for flag, path in _pems(args))
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    metadata = {"authorization": f"Bearer {token}"} if token else {}
    target = f"unix:{args.uds}" if args.uds else args.target
    return Connection(target, credentials, metadata)


def _pems(args: Any) -> list[tuple[str, str | None]]:
    return [("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)]


def _read_pem(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: {exc.strerror}", exit_code=2) from None
