"""Transport security: TLS / mTLS credentials and bearer-token authentication (health and reflection exempt)."""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from .config import ServerConfig
from .errors import Refused, ServiceError, Unauthenticated, status_for

# Methods any caller may use: health probes and reflection. Never authenticated, never counted as requests.
log = logging.getLogger(__name__)
PUBLIC_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; with a client CA, clients must present a certificate."""
    if not config.tls_cert or not config.tls_key:
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The HTTP API's TLS, from the same files as gRPC's: a certificate makes it HTTPS, and a client CA requires a
    client certificate (mTLS)."""
    if not config.tls_cert or not config.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def token_matches(given: str, token: str) -> bool:
    """Whether an `authorization` value is `Bearer <token>`, in constant time (gRPC metadata and HTTP alike)."""
    return hmac.compare_digest(given.encode(errors="replace"), f"Bearer {token}".encode())


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC but health checks and reflection.

    A call without the right token is refused from its headers: its handler never reads the request, so a
    client without a token cannot make the server parse (or hold) its messages. A peer (an address, without the
    port) that fails too often is refused outright for a while, right token or not, so guessing stops there.
    """

    def __init__(self, token: str, limiter: FailedAuthLimiter | None = None) -> None:
        self._token = token
        self.limiter = limiter or FailedAuthLimiter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(PUBLIC_METHODS):
            return await continuation(details)
        handler = await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if not token_matches(str(given), self._token):
            return _refusal(handler, self.limiter)
        if handler is not None and self.limiter.limiting:
            return _guarded(handler, self.limiter)
        return handler


class FailedAuthLimiter:
    """Failed authentications per peer address, in windows of `window` seconds. Past `budget` failures in a
    window, the peer is refused (RESOURCE_EXHAUSTED) until the window ends. One WARNING line per peer and
    window says how many failed: a guessing client cannot grow the log by guessing faster."""

    def __init__(self, budget: int = 20, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.window = window
        self._clock = clock
        self._counts: dict[str, tuple[float, int]] = {}  # peer -> (window start, failures in it)

    @property
    def limiting(self) -> bool:
        """Whether any peer may be over its budget now (checked before wrapping good calls: cheap when not)."""
        now = self._clock()
        return any(n > self.budget and now - start < self.window for start, n in self._counts.values())

    def limited(self, peer: str) -> bool:
        start, count = self._counts.get(peer, (0.0, 0))
        return count > self.budget and self._clock() - start < self.window

    def failed(self, peer: str) -> None:
        now = self._clock()
        start, count = self._counts.get(peer, (now, 0))
        if now - start >= self.window:
            if count > 1:
                log.warning("%d failed authentications from %s in %.0fs", count, peer, now - start)
            start, count = now, 0
        if count == 0:
            log.warning(
                "failed authentication from %s (the next failures in %.0fs are counted, not logged)", peer, self.window
            )
        self._counts[peer] = (start, count + 1)
        if len(self._counts) > MAX_TRACKED_PEERS:  # forget peers whose window has ended
            self._counts = {p: v for p, v in self._counts.items() if now - v[0] < self.window}


MAX_TRACKED_PEERS = 4096


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.1:5123" -> "ipv4:10.0.0.1"): one client, many ports."""
    peer = str(context.peer() or "")
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer.split(":", 1)[0] or "unknown"


UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token in 'authorization'"
LIMITED_MESSAGE = "too many failed authentications from this address; try again later"


async def refuse(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """End the call with `error`'s status and details (ErrorInfo, RetryInfo), as the servicer reports its own."""
    status = status_for(error)
    await context.abort(status.code, status.details, tuple(status.trailing_metadata))


def limited_error() -> ServiceError:
    return Refused(LIMITED_MESSAGE, reason="AUTH_RATE_LIMITED")


def _refusal(handler: grpc.RpcMethodHandler | None, limiter: FailedAuthLimiter) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request: request streaming, so nothing is deserialized."""

    async def deny(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = peer_address(context)
        if limiter.limited(peer):
            await refuse(context, limited_error())
        limiter.failed(peer)
        await refuse(context, Unauthenticated(UNAUTHENTICATED_MESSAGE))

    async def deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(requests, context)
        yield  # pragma: no cover  (makes this an async generator)

    serializer = handler.response_serializer if handler else None
    if handler is not None and (handler.unary_stream is not None or handler.stream_stream is not None):
        return grpc.stream_stream_rpc_method_handler(deny_stream, response_serializer=serializer)
    return grpc.stream_unary_rpc_method_handler(deny, response_serializer=serializer)


def _guarded(handler: grpc.RpcMethodHandler, limiter: FailedAuthLimiter) -> grpc.RpcMethodHandler:
    """The real handler, refusing a peer over its failure budget even with the right token (or guessing would
    go on: a right guess would show)."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        if limiter.limited(peer_address(context)):
            await refuse(context, limited_error())

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    return handler


MAX_WATCHES_PER_PEER = 16  # health Watch streams one peer address may hold open (a probe needs one)


class BoundedHealthServicer(health.aio.HealthServicer):
    """The standard health service, with at most MAX_WATCHES_PER_PEER open Watch streams per peer address: a
    Watch holds a stream and a task for as long as the client likes, and nobody authenticates health."""

    def __init__(self) -> None:
        super().__init__()
        self._watching: dict[str, int] = {}

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        """Every service's status (grpcio-health-checking advertises List but leaves it UNIMPLEMENTED)."""
        from grpc_health.v1 import health_pb2

        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        peer = peer_address(context)
        if self._watching.get(peer, 0) >= MAX_WATCHES_PER_PEER:
            limit = f"at most {MAX_WATCHES_PER_PEER} health watches per address"
            await refuse(context, Refused(limit, reason="TOO_MANY_WATCHES"))
        self._watching[peer] = self._watching.get(peer, 0) + 1
        try:
            await super().Watch(request, context)
        finally:
            self._watching[peer] -= 1
            if not self._watching[peer]:
                del self._watching[peer]
