"""The TCP ports a server will listen on, checked before anything heavy is imported or loaded: a busy port is
said in a second, not after a minute of loading models. Imports only the standard library and the config."""

from __future__ import annotations

import socket

from .config import ConfigError, ServerConfig


def check_ports(config: ServerConfig) -> None:
    """Every TCP port the server will listen on is free (ConfigError naming the first that is not)."""
    check_free(f"{config.host}:{config.port}", "--port")
    if config.health_port is not None:
        check_free(f"{config.health_address}:{config.health_port}", "--health-port")
    if config.metrics_port is not None:
        check_free(f"{config.metrics_address}:{config.metrics_port}", "--metrics-port")
    if config.http_port is not None:
        check_free(f"{config.http_address}:{config.http_port}", "--http-port")


def check_free(address: str, flag: str) -> None:
    """Bind the TCP address once ourselves, as gRPC will, to say why it cannot be had (gRPC's own failure is a
    C-core log line without the reason)."""
    if address.startswith("unix:"):
        return
    host, _, port = address.rpartition(":")
    if port == "0":
        return
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{flag}: cannot listen on {address}: {exc.strerror}") from None
    for family, kind, proto, _, where in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no reason
            try:
                probe.bind(where)
            except OSError as exc:
                raise ConfigError(f"{flag}: cannot listen on {address}: {exc.strerror}") from None
