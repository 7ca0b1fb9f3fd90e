"""Run a DiffusionServer in-process on a loopback port, its asyncio loop on a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from model_store import ModelStore
from service.config import ServerConfig
from service.server import DiffusionServer


class LoopThread:
    """An asyncio loop on its own thread, so blocking test code can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_async(self, coro: Any) -> Any:
        """Start a coroutine on the loop; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@contextlib.contextmanager
def running_server(store: ModelStore, wait: bool = True, **config: Any) -> Iterator[tuple[DiffusionServer, str]]:
    """Start a server over `store` (port 0 on 127.0.0.1); yields (server, target) and stops it after."""
    loop = LoopThread()
    factory = config.pop("factory", None)
    tracer_provider = config.pop("tracer_provider", None)
    cfg = ServerConfig(**{"host": "127.0.0.1", "port": 0, "device": "cpu", **config})

    async def build() -> DiffusionServer:
        if factory:
            return DiffusionServer(cfg, store, factory, tracer_provider=tracer_provider)
        return DiffusionServer(cfg, store, tracer_provider=tracer_provider)

    server = loop.run(build())
    port = loop.run(server.start())
    try:
        if wait:
            loop.run(server.wait_ready(120))
        server.loop_thread = loop  # type: ignore[attr-defined]
        yield server, f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(grace=1))  # a no-op when the test stopped it already
        loop.close()


class Gate:
    """Holds a server's worker inside its next pipeline call or denoising step until the test releases it, so
    requests sent meanwhile queue up behind it: batching that is deterministic, with no long 'blocker' request
    and no sleep.

    Pass `gate.factory` as the server's `factory`. `calls` records the size of every request-batched call,
    `ticks` the items of every step-engine tick.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []
        self.ticks: list[int] = []
        self._armed = True

    def _hold(self) -> None:
        if self._armed:
            self._armed = False
            self.entered.set()
            self.release.wait(120)

    def factory(self, served: Any, device: str, warmup: Any) -> Any:
        from service.workers import backend_factory

        build = backend_factory(served, device, warmup)

        def gated() -> Any:
            worker = build()
            worker.warmup()  # warm-up runs before the gate is wired: it must not be held
            worker.warmup = lambda: None
            run_batch, tick = worker.run_batch, worker.tick

            def gated_run_batch(key: Any, items: Any, on_step: Any) -> Any:
                self.calls.append(len(items))
                self._hold()
                return run_batch(key, items, on_step)

            def gated_tick() -> Any:
                self._hold()
                result = tick()
                self.ticks.append(result.active)
                return result

            worker.run_batch, worker.tick = gated_run_batch, gated_tick
            return worker

        return gated
