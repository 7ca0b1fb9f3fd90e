"""The demo: build the tiny offline model, start a real server, ask it for an image over gRPC, write demo.png.

Uses $DIFFUSERS_GRPC_HOME, or a store inside the checkout (.diffusers-grpc-home/) so nothing leaks into ~.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo.png")
    parser.add_argument("--prompt", default="a watercolor lighthouse at dawn")
    args = parser.parse_args()
    env = {**os.environ}
    env.setdefault("DIFFUSERS_GRPC_HOME", str(ROOT / ".diffusers-grpc-home"))
    cli = [sys.executable, "-m", "service"]

    step("building and importing the tiny demo model (offline, random weights)")
    subprocess.run([*cli, "models", "create-demo"], env=env, check=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    step(f"starting the server on {target}")
    server = subprocess.Popen(
        [*cli, "serve", "tiny-sd", "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", "0"], env=env
    )
    try:
        step("waiting for readiness (grpc.health.v1 diffusion.v1.DiffusionService)")
        deadline = time.monotonic() + 120
        while (
            subprocess.run(
                [*cli, "health", "--target", target, "--timeout", "2"], env=env, capture_output=True
            ).returncode
            != 0
        ):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.3)
        step("requesting an image with TextToImage")
        subprocess.run(
            [
                *cli,
                "generate",
                args.prompt,
                "--target",
                target,
                "--seed",
                "42",
                "--steps",
                "20",
                "-o",
                args.output,
            ],
            env=env,
            check=True,
        )
    finally:
        step("stopping the server (SIGTERM, graceful drain)")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    if code != 0:
        raise SystemExit(f"the server exited with {code}")
    step(f"done: {args.output}")
    return 0


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
