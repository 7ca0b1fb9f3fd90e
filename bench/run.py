"""`make bench`: the tiny f8 model (64x64, 8 steps) measured in ONE run, so ratios are comparable.

(a) the direct in-process pipeline call at batch 1 and batch 8, PNG encode included (the floor);
(b) the server at concurrency 1;
(c) the server at concurrency 4, 16 and 64, with batching on (--max-batch-size 8) and off (--max-batch-size 1);
plus the server's RSS over many requests after warm-up. Prints a table, writes bench/results/bench.json and a
plot. The load generator and the server share this machine's cores: the numbers say so.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS, SIZE = 8, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, latencies: list[float], images: int, seconds: float, batch: float | None) -> dict[str, Any]:
    return {
        "name": name,
        "requests": len(latencies),
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
        "images_per_s": round(images / seconds, 2),
        "mean_batch": None if batch is None else round(batch, 2),
    }


def direct(home: Path, device: str, repeats: int) -> list[dict[str, Any]]:
    """The floor: the pipeline called in this process, plus PNG encoding of its outputs."""
    import torch

    from model_store import ModelStore
    from service import imaging

    runner = ModelStore(home).get("tiny-sd").to_runner(device)
    call = runner.signatures["__call__"]

    def once(batch: int, seed: int) -> None:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        images = call.run(
            prompt=["a lighthouse"] * batch,
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            generator=generators,
            output_type="pil",
        )[0]
        for image in images:
            imaging.encode(image)

    results = []
    for batch, count in ((1, repeats), (8, max(5, repeats // 4))):
        once(batch, 0)  # warm-up
        latencies = []
        start = time.perf_counter()
        for i in range(count):
            t = time.perf_counter()
            once(batch, i)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        results.append(summary(f"direct batch {batch}", latencies, batch * count, elapsed, float(batch)))
    return results


class Server:
    """A real `diffusers-grpc serve` process."""

    def __init__(self, home: Path, max_batch: int, device: str) -> None:
        from service.client import wait_until_serving

        self.port, self.metrics_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "tiny-sd",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--max-batch-size",
                str(max_batch),
                "--device",
                device,
                "--max-queue",
                "1024",
                "--log-level",
                "WARNING",
            ],
            env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_serving(self.target, alive=lambda: self.process.poll() is None)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def batches(self) -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith("diffusers_grpc_batch_size_")
        }
        return values.get("diffusers_grpc_batch_size_sum", 0.0), values.get("diffusers_grpc_batch_size_count", 0.0)

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


async def load(target: str, concurrency: int, requests: int, seed0: int = 0) -> tuple[list[float], float]:
    """`requests` TextToImage calls from `concurrency` concurrent callers; returns latencies and wall time."""
    import grpc

    from service.generated.diffusion.v1 import diffusion_pb2 as pb
    from service.generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc

    latencies: list[float] = []
    counter = iter(range(requests))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)

        async def caller() -> None:
            for i in counter:
                params = pb.GenerationParams(seed=seed0 + i, num_inference_steps=STEPS, height=SIZE, width=SIZE)
                t = time.perf_counter()
                await stub.TextToImage(pb.TextToImageRequest(prompt="a lighthouse", params=params), timeout=300)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def measure(server: Server, name: str, concurrency: int, requests: int) -> dict[str, Any]:
    asyncio.run(load(server.target, concurrency, max(concurrency, 8), seed0=10_000))  # warm-up
    before = server.batches()
    latencies, seconds = asyncio.run(load(server.target, concurrency, requests))
    after = server.batches()
    count = after[1] - before[1]
    return summary(name, latencies, len(latencies), seconds, (after[0] - before[0]) / count if count else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=160, help="requests per server measurement (scaled by c)")
    parser.add_argument("--rss-requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from model_store import ModelStore
    from model_store.demo import save_demo

    home = Path(tempfile.mkdtemp(prefix="bench-store-"))
    save_demo(ModelStore(home))
    rows = direct(home, args.device, repeats=40)
    rss: dict[str, Any] = {}
    for label, max_batch in (("on", 8), ("off", 1)):
        server = Server(home, max_batch, args.device)
        try:
            for concurrency in (1, 4, 16, 64) if label == "on" else (4, 16, 64):
                requests = max(args.requests // 4, 20) if concurrency == 1 else max(args.requests, 4 * concurrency)
                row = measure(server, f"server c={concurrency} batching {label}", concurrency, requests)
                row.update(concurrency=concurrency, batching=label)
                rows.append(row)
                print(_line(row), flush=True)
            if label == "on" and args.rss_requests:
                asyncio.run(load(server.target, 16, 200, seed0=50_000))  # warm-up before the baseline
                start = server.rss()
                asyncio.run(load(server.target, 16, args.rss_requests, seed0=60_000))
                end = server.rss()
                rss = {
                    "requests": args.rss_requests,
                    "start_mib": round(start / 2**20, 1),
                    "end_mib": round(end / 2**20, 1),
                    "change_pct": round(100 * (end - start) / start, 2),
                }
        finally:
            server.stop()
    report = _report(rows, rss, args.device)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    _plot(rows, args.out / "bench.png")
    _print(report)
    return 0


def _report(rows: list[dict[str, Any]], rss: dict[str, Any], device: str) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    direct1, direct8 = by["direct batch 1"], by["direct batch 8"]
    on16, off16, on1 = by["server c=16 batching on"], by["server c=16 batching off"], by["server c=1 batching on"]
    targets = {
        "c1_p50_over_direct_b1": round(on1["p50_ms"] / direct1["p50_ms"], 3),  # target <= 1.05
        "c16_throughput_over_direct_b8": round(on16["images_per_s"] / direct8["images_per_s"], 3),  # >= 0.90
        "c16_batching_on_over_off": round(on16["images_per_s"] / off16["images_per_s"], 3),  # >= 3
        "rss_change_pct": rss.get("change_pct"),  # within 5
    }
    return {
        "model": f"tiny-sd f8, {SIZE}x{SIZE}, {STEPS} steps",
        "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared by the load generator and the server",
        "rows": rows,
        "rss": rss,
        "ratios": targets,
    }


def _line(row: dict[str, Any]) -> str:
    batch = "-" if row["mean_batch"] is None else f"{row['mean_batch']:.2f}"
    return f"{row['name']:<28} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['images_per_s']:>9.1f} {batch:>7}"


def _print(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} on {report['device']}; {report['machine']}")
    print(f"{'run':<28} {'p50 ms':>9} {'p99 ms':>9} {'img/s':>9} {'batch':>7}")
    for row in report["rows"]:
        print(_line(row))
    print(f"RSS: {report['rss']}")
    r = report["ratios"]
    print(f"c=1 p50 / direct b1 p50      = {r['c1_p50_over_direct_b1']}  (target <= 1.05)")
    print(f"c=16 img/s / direct b8 img/s = {r['c16_throughput_over_direct_b8']}  (target >= 0.90)")
    print(f"c=16 batching on / off       = {r['c16_batching_on_over_off']}  (target >= 3)")
    print(f"RSS change after warm-up     = {r['rss_change_pct']}%  (target within 5%)")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for label in ("on", "off"):
        points = sorted((r["concurrency"], r) for r in rows if r.get("batching") == label)
        xs = [c for c, _ in points]
        latency.plot(xs, [r["p50_ms"] for _, r in points], marker="o", label=f"batching {label} p50")
        latency.plot(xs, [r["p99_ms"] for _, r in points], marker="x", linestyle="--", label=f"batching {label} p99")
        throughput.plot(xs, [r["images_per_s"] for _, r in points], marker="o", label=f"batching {label}")
    by = {r["name"]: r for r in rows}
    latency.axhline(by["direct batch 1"]["p50_ms"], color="grey", linestyle=":", label="direct b1 p50")
    throughput.axhline(by["direct batch 8"]["images_per_s"], color="grey", linestyle=":", label="direct b8")
    for axis, title, unit in ((latency, "latency", "ms"), (throughput, "throughput", "images/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.legend(fontsize=7)
    figure.suptitle("diffusers-grpc, tiny f8 model, 64x64, 8 steps (client and server share the cores)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    path.write_bytes(buffer.getvalue())


if __name__ == "__main__":
    sys.exit(main())
