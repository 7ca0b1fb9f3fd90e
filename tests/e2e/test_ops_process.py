"""Operations end to end with real server processes: drain on SIGTERM, the health probe over a Unix socket,
and client-side round-robin across two replicas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from helpers import READINESS, ROOT, cli, free_port, health_status, server_process, wait_for, wait_serving

from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

pytestmark = pytest.mark.e2e


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def start(home, *args: str, load_cue: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A real server process; with `load_cue` (a named pipe), its model loads wait for the test to write to it."""
    port = free_port()
    command = cli("serve", "--host", "127.0.0.1", "--port", str(port), *args)
    if load_cue is not None:
        hooked = [sys.executable, str(ROOT / "tests" / "data" / "hooked_cli.py"), "gate-load", str(load_cue)]
        command = [*hooked, *command[3:]]  # the same CLI arguments, after the hook
    process = subprocess.Popen(
        command,
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=open(home / f"ops-{port}.log", "wb"),  # noqa: SIM115 (the child owns it)
        cwd=ROOT,
    )
    return process, f"127.0.0.1:{port}"


def test_sigterm_turns_readiness_off_keeps_serving_through_the_drain_window_and_exits_0(store_home):
    metrics_port = free_port()
    process, target = start(
        store_home,
        "--metrics-port",
        str(metrics_port),
        "--drain-seconds",
        "3",
        "--grace-seconds",
        "60",
        "--max-batch-size",
        "4",
    )
    try:
        wait_serving(target, process=process)
        with DiffusionClient(target) as client, ThreadPoolExecutor(8) as pool:
            requests = [
                pb.TextToImageRequest(prompt=f"p{i}", params=pb.GenerationParams(seed=i, num_inference_steps=40))
                for i in range(8)
            ]
            futures = [pool.submit(client.stub.TextToImage, r, timeout=120) for r in requests]
            wait_for(lambda: metric(metrics_port, "diffusers_grpc_in_flight_requests") >= 8, what="8 in flight")
            assert not any(f.done() for f in futures), "a request finished before all 8 were in flight"
            process.send_signal(signal.SIGTERM)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            wait_for(lambda: health_status(target, READINESS) == not_serving, what="readiness turning off")
            assert process.poll() is None
            # A balancer may still send calls while it learns that readiness is off: they are served.
            # It queues behind the eight 40-step calls: its deadline leaves room for them on a loaded machine.
            assert client.text_to_image("late", seed=1, steps=2, timeout=120).images
            replies = [f.result(timeout=120) for f in futures]
        assert [r.images[0].seed for r in replies] == list(range(8))
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_health_probe_over_unix_socket_exits_0_1_and_2(store_home, tmp_path):
    socket_path, cue = tmp_path / "grpc.sock", tmp_path / "load-cue"
    os.mkfifo(cue)
    process, target = start(store_home, "--uds", str(socket_path), "--drain-seconds", "0", load_cue=cue)
    probe = cli("health", "--uds", str(socket_path), "--timeout", "2")
    try:
        wait_for(lambda: socket_path.exists() or process.poll() is not None, what="the socket")  # as a probe would
        assert process.poll() is None
        loading = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert loading.returncode == 1 and "NOT_SERVING" in loading.stdout  # the model load waits for our cue
        liveness = subprocess.run([*probe, "--service", ""], capture_output=True, text=True, timeout=60)
        assert liveness.returncode == 0
        cue.write_text("load now")  # opens the pipe: the waiting load goes on
        wait_serving(target, process=process)
        assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert not socket_path.exists()
    gone = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2


def test_serve_pulls_its_models_from_s3_before_readiness(store, store_home, bucket, tmp_path):
    from model_store import ModelStore
    from model_store.remote import RemoteStore

    tag = store.get("tiny-sd").tag
    RemoteStore(f"s3://{bucket}/models").push(store, tag)
    cache = tmp_path / "cache"  # an empty local store: everything served comes from S3
    cache.mkdir()
    with (
        server_process(cache, ["tiny-sd", "--store", f"s3://{bucket}/models"]) as target,
        DiffusionClient(target) as client,
    ):
        assert client.text_to_image("x", seed=1, steps=2, timeout=60).model == tag
    pulled = ModelStore(cache).get(tag)
    pulled.check_files(full=True)
