"""Transport security: TLS / mTLS credentials and bearer-token authentication (health and reflection exempt)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from .config import ServerConfig

# Methods any caller may use: health probes and reflection. Never authenticated, never counted as requests.
PUBLIC_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; with a client CA, clients must present a certificate."""
    if not config.tls_cert or not config.tls_key:
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC but health checks and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(PUBLIC_METHODS):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):  # constant time
            return await continuation(details)
        handler = await continuation(details)
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")
        yield  # pragma: no cover  (makes this an async generator)

    deserializer = handler.request_deserializer if handler else None
    serializer = handler.response_serializer if handler else None
    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=deserializer, response_serializer=serializer)
