"""Server lifecycle: build the gRPC server, load and warm the models, report health, drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batching import BatchReport
from model_store import ModelStore

from .config import ServerConfig
from .engine import build_executor, runner_factory
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc
from .registry import ModelRegistry, ServedModel
from .servicer import DiffusionServicer
from .validation import Limits

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name  # "diffusion.v1.DiffusionService"
LIVENESS = ""


class BatchStats:
    """Counts batches by size: how tests and operators see that batching happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sizes: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()

    def record(self, report: BatchReport) -> None:
        with self._lock:
            self.sizes[report.size] += 1
            self.outcomes[report.outcome] += 1
        log.debug("batch worker=%s size=%d run=%.1fms", report.worker, report.size, report.run_seconds * 1e3)

    @property
    def max_size(self) -> int:
        with self._lock:
            return max(self.sizes, default=0)


class DiffusionServer:
    """One gRPC server over the models named in the config. Use `start`, `wait_ready`, `stop`."""

    def __init__(
        self,
        config: ServerConfig,
        store: ModelStore | None = None,
        factory: Callable[[Sequence[ServedModel], str], Callable[[], object]] = runner_factory,
    ) -> None:
        self.config = config
        self.store = store or ModelStore()
        self.stats = BatchStats()
        served = [ServedModel.of(self.store.get(tag)) for tag in config.tags]
        self.registry = ModelRegistry(served)
        self.executor = build_executor(config, served, self.stats.record, factory)  # type: ignore[arg-type]
        self.servicer = DiffusionServicer(self.registry, self.executor, Limits.of(config))
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=config.grpc_options)
        self.ports: list[int] = []
        self._ready = asyncio.Event()
        self._loading: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and start serving (readiness NOT_SERVING); load and warm the models in the background.

        Returns the bound TCP port (useful with port 0).
        """
        pb_grpc.add_DiffusionServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            names = (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self.server)
        port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.config.uds:
            self.server.add_insecure_port(f"unix:{self.config.uds}")
        self.ports.append(port)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d; loading %s", self.config.host, port, ", ".join(self.config.tags))
        self._loading = asyncio.create_task(self._load())
        return port

    async def _load(self) -> None:
        self.executor.start()
        await asyncio.to_thread(self.executor.wait_ready)
        self.servicer.accepting = True
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._ready.set()
        log.info("ready: %s", ", ".join(m.tag for m in self.registry.models))

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the models are warm; re-raise a loading failure."""
        assert self._loading is not None, "start() first"
        await asyncio.wait_for(asyncio.shield(self._loading), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Readiness NOT_SERVING, refuse new calls, let in-flight calls finish within `grace`, then stop."""
        grace = self.config.grace_seconds if grace is None else grace
        self.servicer.accepting = False
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await asyncio.to_thread(self.executor.shutdown, 1.0)
        self.servicer.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve(config: ServerConfig, store: ModelStore | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully (the `serve` command)."""
    server = DiffusionServer(config, store)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.ensure_future(server.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading in done and loading.exception() is not None:
        await server.stop(0)
        raise loading.exception()  # type: ignore[misc]
    await stopping
    log.info("signal received: draining for up to %.0fs", config.grace_seconds)
    await server.stop()
