"""Server lifecycle: build the gRPC server, load and warm the models, report health, drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import threading
import time
from collections import Counter
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batching import BatchReport
from model_store import ModelStore

from . import tracing
from .config import ConfigError, ServerConfig
from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc
from .http_api import HttpApi
from .ports import check_free, check_ports
from .reflection import add_documented_reflection
from .registry import ModelRegistry, ServedModel, resolve_dtype
from .security import BoundedHealthServicer, TokenAuthInterceptor, server_credentials
from .servicer import DiffusionServicer
from .telemetry import Metrics, TelemetryInterceptor
from .validation import Limits
from .workers import Factory, backend_factory, build_executor, resolve_devices

log = logging.getLogger(__name__)
ADAPTER_REFRESH_SECONDS = 5.0  # an adapter added to the store is usable within this, plus one store listing
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name  # "diffusion.v1.DiffusionService"
LIVENESS = ""
STATUS_SECONDS = 2.0  # after the drain's grace: time for handlers to send the status of what was cut short


class BatchStats:
    """Counts batches by size, outcome and worker: how tests and operators see that batching happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sizes: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.workers: Counter[str] = Counter()

    def record(self, report: BatchReport) -> None:
        with self._lock:
            self.sizes[report.size] += 1
            self.outcomes[report.outcome] += 1
            self.outcomes["cancelled"] += report.cancelled
            self.workers[report.worker] += 1
        log.debug("batch worker=%s size=%d run=%.1fms", report.worker, report.size, report.run_seconds * 1e3)


class DiffusionServer:
    """One gRPC server over the models named in the config. Use `start`, `wait_ready`, `stop`."""

    def __init__(
        self,
        config: ServerConfig,
        store: ModelStore | None = None,
        factory: Factory = backend_factory,
        tracer_provider: Any = None,
    ) -> None:
        """`tracer_provider`: OpenTelemetry's, else the one the `OTEL_*` environment asks for (none: off)."""
        self.config = config
        self.tracer_provider = tracer_provider if tracer_provider is not None else tracing.configure()
        self.store = store or ModelStore()
        swept = self.store.sweep_staging()  # what crashed imports left in .tmp
        if swept:
            log.info("removed %d staging entries that crashed writers left in the store", swept)
        self.stats = BatchStats()
        self.metrics = Metrics()
        try:
            self.devices = resolve_devices(config.device)
        except ValueError as exc:  # --device cuda on a machine without CUDA
            raise ConfigError(str(exc)) from None
        self.metrics.describe_build(",".join(sorted(set(self.devices))))
        self.metrics.watch_device_memory(self.devices)
        if config.compile and not all(device.startswith("cuda") for device in self.devices):
            raise ConfigError(
                f"--compile needs CUDA devices (it pays only there); serving on {', '.join(self.devices)}"
            )
        self.registry = ModelRegistry([self._served(tag) for tag in config.tags])
        self.registry.refresh_adapters(self.store, config.adapters, config.allow_pickle)
        self.executor = build_executor(config, self.registry, self.devices, self._on_batch, factory)
        self.executor.on_unhealthy = self._on_worker_death
        self.metrics.queue_depth.set_function(lambda: len(self.executor.queue))
        self.servicer = DiffusionServicer(
            self.registry,
            self.executor,
            Limits.of(config),
            client_id_header=config.client_id_header,
            on_results=self.metrics.record_results,
            spans=tracing.RequestSpans(self.tracer_provider),
        )
        self.health = BoundedHealthServicer()
        self.telemetry = TelemetryInterceptor(self.metrics, config.log_format == "json")
        # Telemetry first (outermost): a call the token check refuses is still logged and counted.
        interceptors: list[grpc.aio.ServerInterceptor] = [self.telemetry]
        if self.tracer_provider is not None:  # the RPC span, under the client's traceparent, around everything
            interceptors.insert(0, tracing.server_interceptor(self.tracer_provider))
        self.auth = TokenAuthInterceptor(config.auth_token) if config.auth_token else None
        if self.auth is not None:
            interceptors.append(self.auth)
        self.server = grpc.aio.server(options=config.grpc_options, interceptors=interceptors)
        self.http: HttpApi | None = None  # the OpenAI-compatible Images API, with --http-port
        if config.http_port is not None:
            self.http = HttpApi(self.servicer, self.telemetry, config, self.auth.limiter if self.auth else None)
        self._metrics_http: Any = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None  # the bound health-only port, when --health-port is set
        self.workers_stopped = True  # False when a worker was still inside a step after the drain's grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loading: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._stopped = False

    def _served(self, tag: str) -> ServedModel:
        """A stored model with the operator's load options: trust (never the model's word), dtype, compile.
        Every file is hashed against its recorded sha256 first: a model whose files changed is not served."""
        model = self.store.get(tag)
        started = time.monotonic()
        model.check_files(full=True)
        size = sum(int(entry.get("size", 0)) for entry in model.info.files.values())
        log.info(
            "%s: %d files (%.2f GiB) match their sha256 (%.1fs)",
            model.tag,
            len(model.info.files),
            size / 2**30,
            time.monotonic() - started,
        )
        dtype = resolve_dtype(self.config.dtype, model, self.devices[0])
        options = {"trust_remote_code": self.config.trust_remote_code, "torch_dtype": dtype}
        if self.config.allow_pickle:
            options["allow_pickle"] = True
        if self.config.compile:
            options["compile"] = True
        return ServedModel.of(model.with_options(**options), self.config.batching)

    def _on_batch(self, report: BatchReport) -> None:
        self.stats.record(report)
        self.metrics.record_batch(report)

    async def start(self) -> int:
        """Bind and start serving (readiness NOT_SERVING); load and warm the models in the background.

        Returns the bound TCP port (useful with port 0).
        """
        self._loop = asyncio.get_running_loop()
        pb_grpc.add_DiffusionServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            names = (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            add_documented_reflection(names, self.server)
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        port = _bind(self.server, address, "--port", credentials)
        if self.config.uds:
            _remove_stale_socket(self.config.uds)
            _bind(self.server, f"unix:{self.config.uds}", "--uds", None)  # local only: file permissions guard it
        if self.config.health_port is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            health_address = f"{self.config.health_address}:{self.config.health_port}"
            self.health_port = _bind(self._health_server, health_address, "--health-port", None)
        if self.config.metrics_port is not None:
            try:
                self._metrics_http = self.metrics.serve_http(self.config.metrics_port, self.config.metrics_address)
            except OSError as exc:
                where = f"{self.config.metrics_address}:{self.config.metrics_port}"
                raise ConfigError(f"--metrics-port: cannot listen on {where}: {exc.strerror or exc}") from None
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self.config.uds:
            os.chmod(self.config.uds, 0o660)
        scheme = "tls" if credentials else "plaintext"
        log.info(
            "listening on %s (%s)%s%s%s; loading %s",
            address.replace(f":{self.config.port}", f":{port}"),
            scheme,
            f" and unix:{self.config.uds}" if self.config.uds else "",
            f", health on {self.config.health_address}:{self.health_port} (plaintext)" if self.health_port else "",
            f", the OpenAI-compatible HTTP API on {self.config.http_address}:{self.http.port}" if self.http else "",
            ", ".join(self.config.tags),
        )
        self._loading = asyncio.create_task(self._load())
        return port

    async def _load(self) -> None:
        self.executor.start()
        await asyncio.to_thread(self.executor.wait_ready)
        self.servicer.accepting = True
        self._refreshing = asyncio.create_task(self._watch_store())
        self.metrics.models_loaded.set(len(self.registry.models))
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: %s", ", ".join(m.tag for m in self.registry.models))

    async def _watch_store(self) -> None:
        """Every ADAPTER_REFRESH_SECONDS: check that the served models are still in the store (a removed or
        unmounted store turns readiness NOT_SERVING with an ERROR line, and back when it returns), and re-read
        the adapters (when serving every adapter of a model); workers load a new one when first used."""
        missing: list[str] = []
        while True:
            await asyncio.sleep(ADAPTER_REFRESH_SECONDS)
            gone = [m.tag for m in self.registry.models if not (m.model.path / "model.yaml").is_file()]
            if gone and not missing:
                log.error(
                    "the store no longer holds %s (%s): readiness is NOT_SERVING", ", ".join(gone), self.store.home
                )
                await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            elif missing and not gone and self.executor.healthy and not self._stopped:
                log.info("the store holds every served model again: readiness is SERVING")
                await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            missing = gone
            if self.config.adapters is not None or gone:
                continue
            try:
                await asyncio.to_thread(self.registry.refresh_adapters, self.store, None, self.config.allow_pickle)
            except Exception:  # a store being written to, say: keep the adapters known so far, try again
                log.warning("could not refresh the adapters from the store", exc_info=True)

    def _on_worker_death(self) -> None:
        """Called from a dying worker thread: readiness goes NOT_SERVING so traffic moves elsewhere."""
        if self._loop is None:
            return
        self.servicer.accepting = False
        future = asyncio.run_coroutine_threadsafe(
            self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING), self._loop
        )
        future.add_done_callback(lambda f: f.exception())  # never leave an exception unretrieved

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the models are warm; re-raise a loading failure."""
        assert self._loading is not None, "start() first"
        await asyncio.wait_for(asyncio.shield(self._loading), timeout)

    async def stop(self, grace: float | None = None, drain: float = 0.0) -> None:
        """Drain, in three phases, so that no call fails while other replicas could take it:

        1. readiness goes NOT_SERVING at once, and for `drain` seconds the server goes on serving, so load
           balancers and probes see it and move traffic away;
        2. gRPC's graceful stop sends GOAWAY (clients send new calls to other replicas) and refuses new calls,
           while the calls in flight get `grace` seconds to finish;
        3. whatever is still queued or running then fails with UNAVAILABLE, the one status a drain that ran out of
           time gives (the executor fails it; the handlers send that status, so logs and metrics say the same).
        Liveness stays SERVING until the process exits.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            self.servicer.accepting = False
        if self._refreshing is not None:
            self._refreshing.cancel()
        if drain > 0 and self.servicer.accepting:
            log.info("draining: readiness NOT_SERVING, serving for %.0fs more before GOAWAY", drain)
            await asyncio.sleep(drain)
        deadline = time.monotonic() + grace
        log.info("graceful stop: GOAWAY sent; calls in flight have %.0fs to finish", grace)
        # Stop's own grace is longer than ours: at our deadline the executor fails what is left, and the handlers
        # need a moment to send that status before gRPC would cancel their calls (CANCELLED, a different story).
        stopping = asyncio.ensure_future(self.server.stop(grace + STATUS_SECONDS))
        if self.http is not None:  # HTTP's GOAWAY: no new connections, and a 503 for new calls on open ones
            await self.http.stop_accepting()
        await asyncio.sleep(0.05)  # calls that arrived just before GOAWAY start their handlers, and are admitted
        while self.servicer.admitting > 0 and time.monotonic() < deadline:  # accepted calls queue their work
            await asyncio.sleep(0.01)
        self.workers_stopped = await asyncio.to_thread(self.executor.shutdown, max(0.0, deadline - time.monotonic()))
        while self.telemetry.in_flight > 0 and time.monotonic() < deadline + STATUS_SECONDS:
            await asyncio.sleep(0.05)
        await stopping
        if self.http is not None:
            await self.http.close()
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.servicer.close()
        if self.tracer_provider is not None:  # the last spans out before the process goes
            await asyncio.to_thread(self.tracer_provider.shutdown)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.config.uds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.uds)


def _bind(server: grpc.aio.Server, address: str, flag: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on `address`, or say in one line that it cannot (SO_REUSEPORT is off: a port in use is refused)."""
    check_free(address, flag)
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # lost a race for the port since the check, say
        raise ConfigError(f"{flag}: cannot listen on {address}") from None


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed server would make the bind fail; anything else there is not ours."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--uds {path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


def prepare_store(config: ServerConfig) -> tuple[ServerConfig, ModelStore]:
    """The local store to serve from. With `--store s3://...`, pull each model (checksums verified) into the
    local store ($DIFFUSERS_GRPC_HOME, the cache) first, and serve exactly the versions pulled."""
    if not config.store:
        return config, ModelStore()
    if not config.store.startswith("s3://"):
        return config, ModelStore(config.store)
    from model_store.remote import RemoteStore

    local, remote = ModelStore(), RemoteStore(config.store)
    tags = []
    for tag in config.tags:
        log.info("pulling %s from %s", tag, config.store)
        tags.append(remote.pull(tag, into=local).tag)
    return dataclasses.replace(config, tags=tuple(tags)), local


async def serve(config: ServerConfig, store: ModelStore | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully (the `serve` command). A second signal exits at once."""
    check_ports(config)  # before pulling or loading anything: a busy port is said in a second, not a minute
    if store is None:
        config, store = await asyncio.to_thread(prepare_store, config)
    server = DiffusionServer(config, store)
    await server.start()
    stop = asyncio.Event()
    received: list[signal.Signals] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second signal: exiting without draining")
            os._exit(1)
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loading = asyncio.ensure_future(server.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading in done and loading.exception() is not None:
        await server.stop(0)
        raise loading.exception()  # type: ignore[misc]
    await stopping
    # SIGTERM comes from an orchestrator, whose balancers need the drain window; SIGINT is a person at a terminal.
    drain = config.drain_seconds if received[0] == signal.SIGTERM else 0.0
    log.info(
        "%s received: draining (%.0fs serving, then up to %.0fs grace)", received[0].name, drain, config.grace_seconds
    )
    await server.stop(drain=drain)
    log.info("drained; exiting")
    if not server.workers_stopped:
        # A worker is still inside one long denoising step. Its callers have their answers; exiting now, while
        # the interpreter would tear down under it, is what aborted the process: end it here, logs flushed.
        log.warning("a worker is still inside a step; exiting without waiting for it")
        logging.shutdown()
        os._exit(0)
