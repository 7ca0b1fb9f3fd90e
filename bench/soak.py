"""`make soak`: a long, mixed, partly hostile load on a real `diffusers-grpc serve` process, watching for leaks.

Closed-loop asyncio clients (grpc.aio, SOAK_CONCURRENCY of them, default 64) send, for SOAK_SECONDS (default 600):
TextToImage, ImageToImage, Inpaint, Call, Streams read to the end or cancelled after their first progress event,
calls with impossible deadlines, bad inputs and invented model names; all cheap (64x64 or smaller, 2-8 steps), all
to 127.0.0.1, from a seeded RNG (SOAK_SEED, default 0): each client's sequence of requests is repeatable.

Every SOAK_SAMPLE_SECONDS (default 2) it samples the server's RSS, open fds and threads (psutil) and, from /metrics,
the in-flight and queue-depth gauges. It writes bench/results/soak.json and soak.png, the server's log to
soak-server.log, prints a summary, and exits 1 (saying why) on:
- any INTERNAL or UNKNOWN status, or any status outside OK, INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED,
  CANCELLED, RESOURCE_EXHAUSTED; or a kind of request answered against its expectation (a valid request refused,
  a bad one accepted);
- RSS growing more than 10% from the end of the first third of the load to its end;
- open fds or threads not back within a small tolerance of their baseline (taken after a warm-up at full
  concurrency, before the load) once the load stops, within SOAK_SETTLE_SECONDS (default 30) of polling; the
  tolerance is FD_TOLERANCE / THREAD_TOLERANCE below, since gRPC's event-engine pool may keep a few idle workers
  (and their wakeup fds) a while after a burst; every other pool is grown to full size by the warm-up;
- the in-flight gauge (or the queue depth) not back to 0 once idle;
- a prompt, an ERROR line or a traceback in the server's log (at INFO, as in production);
- the server not exiting 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import os
import platform
import random
import re
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "64"))
SEED = int(os.environ.get("SOAK_SEED", "0"))
SAMPLE_SECONDS = float(os.environ.get("SOAK_SAMPLE_SECONDS", "2"))
SETTLE_SECONDS = float(os.environ.get("SOAK_SETTLE_SECONDS", "30"))
OUT = Path(os.environ.get("SOAK_OUT", ROOT / "bench" / "results"))
MAX_REQUESTS = int(os.environ.get("SOAK_MAX_REQUESTS", str(int(SECONDS * 500) + 1000)))  # a bound, not a target

RSS_GROWTH_LIMIT = 0.10
FD_TOLERANCE = 4
THREAD_TOLERANCE = 4
TIMEOUT = 120.0  # per valid request; generous, so only a wedged server times out
HOST = "127.0.0.1"
FINE = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}
BUSY = {"RESOURCE_EXHAUSTED"}
GAUGES = ("diffusers_grpc_in_flight_requests", "diffusers_grpc_queue_depth")  # a full queue may refuse anything

# Prompts are private: none of their words may appear in the server's log (the long one is truncated by CLIP).
PROMPTS = ("a lighthouse", "a fox in the snow", "", "🦊 " * 40, "a red door\n" * 3)
PROMPT_WORDS = ("lighthouse", "fox in the snow", "red door", "🦊")

# kind of request -> (weight in the mix, the codes that answer it correctly)
KINDS: dict[str, tuple[int, set[str]]] = {
    "text_to_image": (20, {"OK"} | BUSY),
    "image_to_image": (10, {"OK"} | BUSY),
    "inpaint": (10, {"OK"} | BUSY),
    "call": (10, {"OK"} | BUSY),
    "stream": (4, {"OK"} | BUSY),
    "stream_cancelled": (8, {"CANCELLED", "OK"} | BUSY),  # OK only if it finished before its first event
    "impossible_deadline": (8, {"DEADLINE_EXCEEDED"} | BUSY),
    "bad_input": (14, {"INVALID_ARGUMENT"} | BUSY),
    "invented_model": (10, {"NOT_FOUND", "INVALID_ARGUMENT"} | BUSY),
    "discovery": (4, {"OK"}),
    # A Call whose prompt is a list: an image per prompt within --max-images, INVALID_ARGUMENT past it.
    "list_prompt_call": (6, {"OK", "INVALID_ARGUMENT"} | BUSY),
}
# The flooding client: FLOOD_CLIENTS more connections under one identity, each sending 4-image requests back to
# back. Its share of the queue (--max-queue-per-client) bounds what it holds; the others must still be served.
FLOOD_CLIENTS = 8
FLOOD_KIND = "flood"
FLOOD_CODES = {"OK"} | BUSY
CLIENT_HEADER = "x-client"
_client_id: contextvars.ContextVar[str] = contextvars.ContextVar("client_id", default="")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """A real `diffusers-grpc serve` process over its own temporary store holding the tiny demo model."""

    def __init__(self, home: Path, log_path: Path) -> None:
        from service.client import wait_until_serving

        self.port, self.metrics_port = free_port(), free_port()
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "tiny-sd",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--device",
                "cpu",
                "--max-queue",
                "512",
                "--max-queue-per-client",
                "64",
                "--client-id-header",
                CLIENT_HEADER,
                "--log-level",
                "INFO",
            ],
            env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home), "HF_HUB_OFFLINE": "1"},
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until_serving(self.target, timeout=180, alive=lambda: self.process.poll() is None)
        import psutil

        self.ps = psutil.Process(self.process.pid)
        self.ps.cpu_percent(None)  # the first call only starts the measurement
        self.stop_seconds: float | None = None

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def metrics(self) -> tuple[dict[str, float], int, int]:
        """The gauges we watch, the size of /metrics in bytes and its number of request-counter series."""
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        gauges = {}
        for name in GAUGES:
            match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
            gauges[name] = float(match.group(1)) if match else float("nan")
        series = sum(1 for line in text.splitlines() if line.startswith("diffusers_grpc_requests_total{"))
        return gauges, len(text), series

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM, then the exit code (None if it did not exit in time; it is killed then)."""
        code: int | None
        started = time.monotonic()
        try:
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout)
            self.stop_seconds = round(time.monotonic() - started, 2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            code = None
        self.log.close()
        return code


# --- requests ------------------------------------------------------------------------------------------------------


def _png(array: Any, mode: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def input_images(rng: random.Random) -> tuple[list[bytes], bytes]:
    """A few 64x64 RGB inputs and one half mask."""
    import numpy as np

    generator = np.random.default_rng(rng.randrange(2**32))
    images = [_png(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB") for _ in range(4)]
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    return images, _png(mask, "L")


def invented_model(rng: random.Random) -> str:
    shape = rng.randrange(5)
    if shape == 0:  # a valid name nobody serves: NOT_FOUND
        return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(3, 20)))
    if shape == 1:  # long
        return "m" * rng.randint(64, 1000)
    if shape == 2:  # with newlines
        return "tiny-sd\n" + "x\n" * rng.randint(1, 20)
    if shape == 3:  # printable noise
        return "".join(rng.choices(string.printable, k=rng.randint(1, 60)))
    return "".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 30)))  # non-ASCII


@dataclass
class Load:
    """What the clients saw."""

    records: list[tuple[str, str, float, float]] = field(default_factory=list)  # kind, code, seconds, ended at
    samples: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, code) -> one detail, for reports
    sent: int = 0


class Clients:
    def __init__(self, target: str, seed: int) -> None:
        self.target = target
        self.images, self.mask = input_images(random.Random(seed))

    async def one(self, kind: str, rng: random.Random, stub: Any, load: Load) -> None:
        import grpc

        from service.generated.diffusion.v1 import diffusion_pb2 as pb

        started = time.perf_counter()
        detail = ""
        steps = rng.randint(2, 8)
        size = rng.choice((32, 48, 64))
        params = pb.GenerationParams(
            seed=rng.randrange(2**63),
            num_inference_steps=steps,
            height=size,
            width=size,
            num_images=rng.choice((1, 1, 1, 2)),
            output_format=rng.choice((pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_JPEG, pb.OUTPUT_FORMAT_WEBP)),
        )
        prompt = rng.choice(PROMPTS)
        if not prompt.strip() and kind not in ("image_to_image", "inpaint"):
            prompt = PROMPTS[0]  # a text-to-image request without a prompt is INVALID_ARGUMENT naming it
        try:
            if kind == "text_to_image":
                await stub.TextToImage(pb.TextToImageRequest(prompt=prompt, params=params), timeout=TIMEOUT)
            elif kind == "image_to_image":
                request = pb.ImageToImageRequest(
                    prompt=prompt,
                    params=params,
                    image=pb.Image(data=rng.choice(self.images)),
                    strength=rng.uniform(0.5, 1.0),
                )
                await stub.ImageToImage(request, timeout=TIMEOUT)
            elif kind == "inpaint":
                request = pb.InpaintRequest(
                    prompt=prompt,
                    params=pb.GenerationParams(seed=params.seed, num_inference_steps=steps),
                    image=pb.Image(data=rng.choice(self.images)),
                    mask_image=pb.Image(data=self.mask),
                )
                await stub.Inpaint(request, timeout=TIMEOUT)
            elif kind == "call":
                request = pb.CallRequest(signature="__call__", seed=rng.randrange(2**63))
                request.arguments.update(
                    {
                        "prompt": prompt,
                        "num_inference_steps": steps,
                        "height": size,
                        "width": size,
                        "guidance_scale": rng.choice((1.0, 5.0, 7.5)),
                        "output_type": rng.choice(("pil", "latent")),
                    }
                )
                await stub.Call(request, timeout=TIMEOUT)
            elif kind in ("stream", "stream_cancelled"):
                params.num_inference_steps = max(steps, 4)
                request = pb.StreamRequest(
                    text_to_image=pb.TextToImageRequest(prompt=prompt, params=params),
                    preview_every=rng.choice((0, 2)),
                )
                call = stub.Stream(request, timeout=TIMEOUT)
                async for event in call:
                    if kind == "stream_cancelled" and event.WhichOneof("event") == "progress":
                        call.cancel()
                        break
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    detail = await call.details() or ""
                self._record(load, kind, code.name, started, detail)
                return
            elif kind == "impossible_deadline":
                await stub.TextToImage(pb.TextToImageRequest(prompt=prompt, params=params), timeout=0.001)
            elif kind == "bad_input":
                await self._bad_input(rng, stub, params)
            elif kind == "invented_model":
                request = pb.TextToImageRequest(model=invented_model(rng), prompt=prompt, params=params)
                await stub.TextToImage(request, timeout=TIMEOUT)
            elif kind == "list_prompt_call":
                request = pb.CallRequest(signature="__call__", seed=rng.randrange(2**63))
                count = rng.choice((2, 3, 64))  # 64 is over --max-images: refused, never run
                request.arguments.update({"prompt": [prompt] * count, "num_inference_steps": steps})
                await stub.Call(request, timeout=TIMEOUT)
            elif kind == FLOOD_KIND:
                params.num_images, params.num_inference_steps = 4, 8
                await stub.TextToImage(pb.TextToImageRequest(prompt=prompt, params=params), timeout=TIMEOUT)
            elif kind == "discovery":
                if rng.random() < 0.5:
                    await stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
                else:
                    await stub.GetModel(pb.GetModelRequest(model=rng.choice(("", "tiny-sd"))), timeout=TIMEOUT)
            code_name = "OK"
        except grpc.aio.AioRpcError as exc:
            code_name, detail = exc.code().name, exc.details() or ""
        self._record(load, kind, code_name, started, detail)

    async def _bad_input(self, rng: random.Random, stub: Any, params: Any) -> None:
        import numpy as np

        from service.generated.diffusion.v1 import diffusion_pb2 as pb

        image = pb.Image(data=rng.choice(self.images))
        which = rng.randrange(7)
        if which == 0:
            params.height = 7
            await stub.TextToImage(pb.TextToImageRequest(prompt="x", params=params), timeout=TIMEOUT)
        elif which == 1:
            bad = pb.Image(data=rng.choice((b"not an image", rng.choice(self.images)[:50], bytes(200))))
            await stub.ImageToImage(pb.ImageToImageRequest(prompt="x", params=params, image=bad), timeout=TIMEOUT)
        elif which == 2:
            params.scheduler = rng.choice(("NoSuchScheduler", "__class__", "Euler\n"))
            await stub.TextToImage(pb.TextToImageRequest(prompt="x", params=params), timeout=TIMEOUT)
        elif which == 3:
            request = pb.ImageToImageRequest(prompt="x", params=params, image=image, strength=-rng.uniform(0.1, 5))
            await stub.ImageToImage(request, timeout=TIMEOUT)
        elif which == 4:
            small = pb.Image(data=_png(np.zeros((16, 16), np.uint8), "L"))
            request = pb.InpaintRequest(prompt="x", params=params, image=image, mask_image=small)
            await stub.Inpaint(request, timeout=TIMEOUT)
        elif which == 5:
            request = pb.CallRequest(signature="__call__")
            request.arguments.update({"prompt": "x", "no_such_argument": 1})
            await stub.Call(request, timeout=TIMEOUT)
        else:
            params.quality = 0
            params.output_format = pb.OUTPUT_FORMAT_JPEG
            await stub.TextToImage(pb.TextToImageRequest(prompt="x", params=params), timeout=TIMEOUT)

    @staticmethod
    def _record(load: Load, kind: str, code: str, started: float, detail: str) -> None:
        load.records.append((kind, code, time.perf_counter() - started, time.monotonic()))
        load.samples.setdefault((kind, code), detail[:300])

    async def run(self, seconds: float, concurrency: int, seed: int, max_requests: int, kinds: list[str]) -> Load:
        """`concurrency` closed-loop clients until `seconds` pass or `max_requests` are sent."""
        import grpc

        from service.generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc

        load = Load()
        weights = [KINDS[k][0] for k in kinds]
        deadline = time.monotonic() + seconds
        channels = [grpc.aio.insecure_channel(self.target, interceptors=_identity()) for _ in range(4)]
        stubs = [pb_grpc.DiffusionServiceStub(c) for c in channels]

        async def client(index: int) -> None:
            rng = random.Random(seed * 100_003 + index)
            flooding = index >= concurrency
            _client_id.set(FLOOD_KIND if flooding else f"client-{index}")  # each task has its own context
            while time.monotonic() < deadline and load.sent < max_requests:
                load.sent += 1
                kind = FLOOD_KIND if flooding else rng.choices(kinds, weights)[0]
                if rng.random() < 0.03:  # now and then a fresh connection, closed right after: fd churn
                    async with grpc.aio.insecure_channel(self.target, interceptors=_identity()) as fresh:
                        await self.one(kind, rng, pb_grpc.DiffusionServiceStub(fresh), load)
                else:
                    await self.one(kind, rng, stubs[index % len(stubs)], load)

        try:
            tasks = [asyncio.ensure_future(client(i)) for i in range(concurrency + FLOOD_CLIENTS)]
            # Every request has a timeout, so the clients end by themselves; this is a backstop.
            done, pending = await asyncio.wait(tasks, timeout=seconds + TIMEOUT + 60)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()
        finally:
            for channel in channels:
                await channel.close()
        return load


def _identity() -> list[Any]:
    """Client interceptors that send each client task's identity in CLIENT_HEADER (the server's queue share)."""
    import grpc

    def with_identity(details: Any) -> Any:
        metadata = [*(details.metadata or ()), (CLIENT_HEADER, _client_id.get())]
        return details._replace(metadata=metadata)

    class Unary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(with_identity(details), request)

    class Streaming(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(with_identity(details), request)

    return [Unary(), Streaming()]


# --- sampling ------------------------------------------------------------------------------------------------------


@dataclass
class Series:
    t: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    in_flight: list[float] = field(default_factory=list)
    queue_depth: list[float] = field(default_factory=list)
    metrics_bytes: list[int] = field(default_factory=list)
    metrics_series: list[int] = field(default_factory=list)
    server_cpu_pct: list[float] = field(default_factory=list)  # tells a stalled server from a starved one
    load_avg: list[float] = field(default_factory=list)  # the machine's 1-minute load (the cores are shared)

    def take(self, server: Server, t0: float, phase: str) -> dict[str, Any]:
        memory = server.ps.memory_info().rss / 2**20
        fds, threads = server.ps.num_fds(), server.ps.num_threads()
        try:
            gauges, size, series = server.metrics()
        except OSError:  # /metrics did not answer in time (a busy server): a gap in the gauges, not a failure
            gauges, size, series = {k: float("nan") for k in GAUGES}, 0, 0
        row = {
            "t": round(time.monotonic() - t0, 2),
            "phase": phase,
            "rss_mb": round(memory, 1),
            "fds": fds,
            "threads": threads,
            "in_flight": gauges["diffusers_grpc_in_flight_requests"],
            "queue_depth": gauges["diffusers_grpc_queue_depth"],
            "metrics_bytes": size,
            "metrics_series": series,
            "server_cpu_pct": server.ps.cpu_percent(None),  # since the previous sample
            "load_avg": round(os.getloadavg()[0], 2),
        }
        for name, value in row.items():
            getattr(self, name).append(value)
        return row


async def sample_every(series: Series, server: Server, t0: float, phase: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(series.take, server, t0, phase[0])
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)
        except asyncio.TimeoutError:
            pass


# --- the run -------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def soak(server: Server, series: Series, t0: float) -> dict[str, Any]:
    import grpc

    from service.generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc

    clients = Clients(server.target, SEED)
    kinds = list(KINDS)
    phase = ["warm-up"]
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_every(series, server, t0, phase, stop))
    try:
        # Warm-up: every kind once, then a burst at full concurrency, so that lazy pools and caches are full size.
        warm = Load()
        async with grpc.aio.insecure_channel(server.target) as channel:
            for i, kind in enumerate(kinds):
                await clients.one(kind, random.Random(-1 - i), pb_grpc.DiffusionServiceStub(channel), warm)
        warm_seconds = min(15.0, max(3.0, SECONDS / 20))
        burst = await clients.run(warm_seconds, CONCURRENCY, SEED + 7919, MAX_REQUESTS, kinds)
        idle = await wait_idle(server, SETTLE_SECONDS)
        baseline_rows = []
        for _ in range(3):
            await asyncio.sleep(0.5)
            baseline_rows.append(await asyncio.to_thread(series.take, server, t0, "baseline"))
        baseline = {
            "fds": sorted(r["fds"] for r in baseline_rows)[1],
            "threads": sorted(r["threads"] for r in baseline_rows)[1],
            "rss_mb": baseline_rows[-1]["rss_mb"],
            "idle_after_warm_up": idle,
            "warm_up_requests": len(warm.records) + len(burst.records),
            # the first request of each kind, alone on a fresh server: first-use costs (derived pipelines, ...)
            "first_request_ms": {kind: round(seconds * 1e3, 1) for kind, _, seconds, _ in warm.records},
        }
        warm_codes = Counter(code for _, code, _, _ in warm.records + burst.records)

        phase[0] = "load"
        load_start = time.monotonic()
        load = await clients.run(SECONDS, CONCURRENCY, SEED, MAX_REQUESTS, kinds)
        load_end = time.monotonic()
        await asyncio.to_thread(series.take, server, t0, "load")  # the end of the load

        phase[0] = "settle"
        settled = await settle(server, series, t0, baseline)
    finally:
        stop.set()
        await sampler
    return {
        "baseline": baseline,
        "warm_codes": warm_codes,
        "load": load,
        "load_start": load_start - t0,
        "load_end": load_end - t0,
        "settled": settled,
        "t0": t0,
    }


async def wait_idle(server: Server, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            gauges, _, _ = await asyncio.to_thread(server.metrics)
        except OSError:
            gauges = {}
        if gauges.get(GAUGES[0]) == 0 and gauges.get(GAUGES[1]) == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def settle(server: Server, series: Series, t0: float, baseline: dict[str, Any]) -> dict[str, Any]:
    """Poll until in-flight and queue depth are 0 and fds and threads are back near their baseline."""
    deadline = time.monotonic() + SETTLE_SECONDS
    started = time.monotonic()
    while True:
        row = await asyncio.to_thread(series.take, server, t0, "settle")
        ok = (
            row["in_flight"] == 0
            and row["queue_depth"] == 0
            and row["fds"] <= baseline["fds"] + FD_TOLERANCE
            and row["threads"] <= baseline["threads"] + THREAD_TOLERANCE
        )
        if ok or time.monotonic() >= deadline:
            return {**row, "settled": ok, "after_s": round(time.monotonic() - started, 1)}
        await asyncio.sleep(0.5)


def log_findings(log: str) -> list[str]:
    """What the server's log must never hold: a prompt, or an ERROR (operators page on those)."""
    findings = []
    quoting = [line for line in log.splitlines() if any(word in line for word in PROMPT_WORDS)]
    if quoting:
        findings.append(f"{len(quoting)} server log lines quote a prompt, such as {quoting[0][:160]!r}")
    errors = [line for line in log.splitlines() if " ERROR " in line or line.startswith("Traceback")]
    if errors:
        findings.append(f"{len(errors)} ERROR lines or tracebacks in the server log, such as {errors[0][:160]!r}")
    return findings


def analyse(
    result: dict[str, Any], series: Series, exit_code: int | None, died: str | None, log: str
) -> dict[str, Any]:
    load: Load = result["load"]
    baseline = result["baseline"]
    settled = result["settled"]
    codes = Counter(code for _, code, _, _ in load.records)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for kind, code, _, _ in load.records:
        by_kind[kind][code] += 1
    ok_latencies = [seconds for _, code, seconds, _ in load.records if code == "OK"]
    duration = result["load_end"] - result["load_start"]

    failures: list[str] = []
    warnings: list[str] = []
    if died:
        failures.append(died)
    for code in ("INTERNAL", "UNKNOWN"):
        if codes[code]:
            kinds = sorted(k for k, c in by_kind.items() if c[code])
            failures.append(f"{codes[code]} requests ended {code} ({', '.join(kinds)}); see soak-server.log")
    for code in sorted(set(codes) - FINE - {"INTERNAL", "UNKNOWN"}):
        failures.append(f"{codes[code]} requests ended {code}, which no request of this mix should get")
    mismatches = {}
    for kind, counts in sorted(by_kind.items()):
        expected = KINDS[kind][1] if kind in KINDS else FLOOD_CODES
        wrong = {code: n for code, n in counts.items() if code not in expected and code in FINE}
        if wrong:
            mismatches[kind] = wrong
            examples = "; ".join(f"{code}: {load.samples.get((kind, code), '')[:120]!r}" for code in wrong)
            failures.append(f"{kind} requests answered {wrong}, expected {sorted(expected)} ({examples})")
    polite = by_kind.get("text_to_image", {})
    if sum(polite.values()) and not polite.get("OK"):  # the flood's share must leave room for everyone else
        failures.append(f"no text_to_image request was served beside the flooding client: {dict(polite)}")

    # RSS: the end of the first third of the load against the end of the load.
    load_rows = [i for i, p in enumerate(series.phase) if p == "load"]
    third_at = result["load_start"] + duration / 3
    third = [i for i in load_rows if series.t[i] <= third_at]
    rss_third = series.rss_mb[third[-1]] if third else None
    rss_end = series.rss_mb[load_rows[-1]] if load_rows else None
    rss_growth = (rss_end - rss_third) / rss_third if rss_third and rss_end else None
    if rss_growth is not None and rss_growth > RSS_GROWTH_LIMIT:
        failures.append(
            f"RSS grew {100 * rss_growth:.1f}% ({rss_third} -> {rss_end} MB) from the first third of the load to "
            f"its end; the limit is {100 * RSS_GROWTH_LIMIT:.0f}%"
        )
    if rss_growth is None:
        warnings.append("too few samples to judge RSS growth (run longer or sample more often)")
    if not settled["settled"]:
        if settled["in_flight"] != 0 or settled["queue_depth"] != 0:
            failures.append(
                f"in-flight {settled['in_flight']:g} and queue depth {settled['queue_depth']:g} not back to 0 "
                f"{SETTLE_SECONDS:.0f}s after the load"
            )
        if settled["fds"] > baseline["fds"] + FD_TOLERANCE:
            failures.append(
                f"{settled['fds']} open fds {SETTLE_SECONDS:.0f}s after the load; baseline {baseline['fds']} "
                f"(+{FD_TOLERANCE} allowed)"
            )
        if settled["threads"] > baseline["threads"] + THREAD_TOLERANCE:
            failures.append(
                f"{settled['threads']} threads {SETTLE_SECONDS:.0f}s after the load; baseline "
                f"{baseline['threads']} (+{THREAD_TOLERANCE} allowed)"
            )
    failures += log_findings(log)
    if exit_code != 0:
        failures.append(f"the server exited with {exit_code} on SIGTERM (None: not within 90 s), expected 0")
    busiest = max((series.load_avg[i] for i in load_rows), default=0.0)
    if busiest > (os.cpu_count() or 1):
        warnings.append(
            f"the machine's load average reached {busiest:.1f} on {os.cpu_count()} cores during the load: other "
            "processes competed for the CPU, so latency and throughput here say little about the server"
        )
    series_start = next((series.metrics_series[i] for i in load_rows), None)
    if series_start is not None and series.metrics_series[-1] > series_start + 100:
        warnings.append(
            f"/metrics grew from {series_start} to {series.metrics_series[-1]} request-counter series "
            f"({series.metrics_bytes[load_rows[0]]} -> {series.metrics_bytes[-1]} bytes): the `model` label takes "
            "invented model names, so its cardinality (and the server's memory) grows without bound"
        )
    return {
        "duration_s": round(duration, 1),
        "concurrency": CONCURRENCY,
        "seed": SEED,
        "requests": len(load.records),
        "requests_per_s": round(len(load.records) / duration, 2) if duration else None,
        "codes": dict(sorted(codes.items())),  # every answer, OK included
        "errors_by_code": {code: n for code, n in sorted(codes.items()) if code != "OK"},  # the expected ones too
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "mismatches": mismatches,
        "p50_ms": _ms(percentile(ok_latencies, 0.5)),
        "p99_ms": _ms(percentile(ok_latencies, 0.99)),
        "latency_ms_by_kind": {
            kind: {
                "p50": _ms(percentile([s for k, _, s, _ in load.records if k == kind], 0.5)),
                "p99": _ms(percentile([s for k, _, s, _ in load.records if k == kind], 0.99)),
                "max": _ms(max((s for k, _, s, _ in load.records if k == kind), default=None)),
            }
            for kind in sorted(by_kind)
        },
        "baseline": baseline,
        "tolerance": {"fds": FD_TOLERANCE, "threads": THREAD_TOLERANCE, "rss_growth": RSS_GROWTH_LIMIT},
        "rss_mb_first_third": rss_third,
        "rss_mb_end": rss_end,
        "rss_growth_pct": None if rss_growth is None else round(100 * rss_growth, 2),
        "idle": settled,
        "server_exit_code": exit_code,
        "warm_up_codes": dict(sorted(result["warm_codes"].items())),
        "load_start_s": round(result["load_start"], 2),
        "load_end_s": round(result["load_end"], 2),
        "t_s": series.t,
        "phase": series.phase,
        "rss_mb": series.rss_mb,
        "fds": series.fds,
        "threads": series.threads,
        "in_flight": series.in_flight,
        "queue_depth": series.queue_depth,
        "metrics_bytes": series.metrics_bytes,
        "metrics_series": series.metrics_series,
        "server_cpu_pct": series.server_cpu_pct,
        "load_avg": series.load_avg,
        "throughput_per_s": throughput(load, series, result["t0"]),
        "failures": failures,
        "warnings": warnings,
        "passed": not failures,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared by the clients and the server",
    }


def _no_nan(value: Any) -> Any:
    """Strict JSON: NaN (a gauge /metrics did not give) becomes null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def throughput(load: Load, series: Series, t0: float) -> list[float]:
    """Requests of the load answered per second in each sampling interval."""
    ends = sorted(end - t0 for _, _, _, end in load.records)
    out, j = [], 0
    for i, t in enumerate(series.t):
        start = series.t[i - 1] if i else 0.0
        count = 0
        while j < len(ends) and ends[j] <= t:
            count += 1
            j += 1
        out.append(round(count / (t - start), 2) if t > start else 0.0)
    return out


def print_summary(report: dict[str, Any], out: Path) -> None:
    codes = sorted({c for counts in report["by_kind"].values() for c in counts})
    print(
        f"\nsoak: {report['duration_s']} s at concurrency {report['concurrency']} (seed {report['seed']}), "
        f"{report['requests']} requests, {report['requests_per_s']} req/s; {report['machine']}"
    )
    print(f"{'kind':<20}" + "".join(f"{c[:12]:>13}" for c in codes) + f"{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind, counts in report["by_kind"].items():
        latency = report["latency_ms_by_kind"][kind]
        print(
            f"{kind:<20}"
            + "".join(f"{counts.get(c, 0):>13}" for c in codes)
            + f"{latency['p50']:>10.0f}{latency['p99']:>10.0f}{latency['max']:>10.0f}"
        )
    print(f"{'all':<20}" + "".join(f"{report['codes'].get(c, 0):>13}" for c in codes))
    print(f"latency of OK requests: p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms")
    base, idle = report["baseline"], report["idle"]
    print(
        f"RSS: {report['rss_mb_first_third']} MB at 1/3 of the load -> {report['rss_mb_end']} MB at its end "
        f"({report['rss_growth_pct']}%, limit {100 * RSS_GROWTH_LIMIT:.0f}%); {idle['rss_mb']} MB idle"
    )
    print(f"fds: baseline {base['fds']}, peak {max(report['fds'])}, idle {idle['fds']} (+{FD_TOLERANCE} allowed)")
    print(
        f"threads: baseline {base['threads']}, peak {max(report['threads'])}, idle {idle['threads']} "
        f"(+{THREAD_TOLERANCE} allowed)"
    )
    print(
        f"in-flight / queue depth when idle: {idle['in_flight']:g} / {idle['queue_depth']:g} "
        f"({'settled' if idle['settled'] else 'NOT settled'} {idle['after_s']} s after the load)"
    )
    print(f"server exit code on SIGTERM: {report['server_exit_code']} (exited after {report['server_stop_s']} s)")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    print(f"wrote {out / 'soak.json'}, {out / 'soak.png'}, {out / 'soak-server.log'}")
    if report["passed"]:
        print("soak: PASS")
    else:
        print("soak: FAIL")
        for failure in report["failures"]:
            print(f"  - {failure}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["t_s"]
    figure, axes = plt.subplots(2, 4, figsize=(18, 7), sharex=True)
    panels = [
        ("rss_mb", "RSS (MB)", None),
        ("fds", "open fds", report["baseline"]["fds"] + FD_TOLERANCE),
        ("threads", "threads", report["baseline"]["threads"] + THREAD_TOLERANCE),
        ("in_flight", "in-flight RPCs / queue depth", None),
        ("throughput_per_s", "answers per second", None),
        ("metrics_series", "request-counter series in /metrics", None),
        ("server_cpu_pct", "server CPU % / machine load x 100", None),
    ]
    for axis, (key, title, limit) in zip(axes.flat, panels):
        axis.plot(t, report[key], marker=".", linewidth=1, label=key)
        if key == "in_flight":
            axis.plot(t, report["queue_depth"], marker=".", linewidth=1, label="queue_depth")
            axis.legend(fontsize=7)
        if key == "server_cpu_pct":
            axis.plot(t, [100 * v for v in report["load_avg"]], marker=".", linewidth=1, label="load average x 100")
            axis.legend(fontsize=7)
        if limit is not None:
            axis.axhline(limit, color="red", linestyle=":", linewidth=1, label="baseline + tolerance")
            axis.legend(fontsize=7)
        axis.axvspan(report["load_start_s"], report["load_end_s"], color="grey", alpha=0.12)
        axis.axvline(report["load_start_s"] + report["duration_s"] / 3, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("seconds (shaded: load; dashed: end of its first third)", fontsize=7)
    axes.flat[-1].axis("off")
    verdict = "PASS" if report["passed"] else "FAIL"
    figure.suptitle(
        f"diffusers-grpc soak: {report['duration_s']} s, concurrency {report['concurrency']}, "
        f"{report['requests']} requests, {verdict}"
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    path.write_bytes(buffer.getvalue())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    from model_store import ModelStore
    from model_store.demo import save_demo

    home = Path(tempfile.mkdtemp(prefix="soak-store-"))
    save_demo(ModelStore(home))
    print(f"soak: {SECONDS:g} s at concurrency {CONCURRENCY}, seed {SEED}; starting the server", flush=True)
    server = Server(home, OUT / "soak-server.log")
    series = Series()
    t0 = time.monotonic()
    died = None
    try:
        result = asyncio.run(soak(server, series, t0))
        if server.process.poll() is not None:
            died = f"the server died during the run (exit code {server.process.returncode})"
    except Exception as exc:
        alive = server.process.poll() is None
        exit_code = server.stop()
        print(f"soak: FAIL: the run broke off: {type(exc).__name__}: {exc}")
        print(f"  (server {'alive' if alive else 'dead'}; exit code {exit_code}; its log: {OUT / 'soak-server.log'})")
        return 1
    exit_code = server.stop()
    log = (OUT / "soak-server.log").read_text(errors="replace")
    report = analyse(result, series, exit_code, died, log)
    report["server_stop_s"] = server.stop_seconds  # SIGTERM to exit: the drain waits for in-flight RPCs
    (OUT / "soak.json").write_text(json.dumps(_no_nan(report), indent=1))
    plot(report, OUT / "soak.png")
    print_summary(report, OUT)
    if not report["passed"]:
        tail = [line[:300] for line in log.splitlines()][-30:]
        if tail:
            print("last lines of the server log:\n  " + "\n  ".join(tail))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
