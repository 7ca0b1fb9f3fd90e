"""Draining real server processes: a round_robin client spreads its calls over two replicas and loses none while one
drains, and a grace period that runs out ends the calls left with one status (UNAVAILABLE), logged as such, and
exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from helpers import READINESS, cli, free_port, health_status, wait_for, wait_serving

from service.generated.diffusion.v1 import diffusion_pb2 as pb
from service.generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


def start(home: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = home / f"drain-{port}.log"
    process = subprocess.Popen(
        cli("serve", "--host", "127.0.0.1", "--port", str(port), "--batching", "request", *args),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 (the child owns it)
    )
    return process, f"127.0.0.1:{port}", log


def test_a_round_robin_client_loses_no_call_while_one_of_two_replicas_drains(store_home):
    first, first_target, first_log = start(store_home, "--drain-seconds", "2", "--grace-seconds", "20")
    second, second_target, second_log = start(store_home)
    processes = [first, second]
    try:
        for process, target in ((first, first_target), (second, second_target)):
            wait_serving(target, process=process)
        # The documented client: round_robin over both addresses, and no healthCheckConfig in its service config.
        options = [("grpc.lb_policy_name", "round_robin")]
        channel = grpc.insecure_channel(f"ipv4:{first_target},{second_target}", options=options)
        stub = pb_grpc.DiffusionServiceStub(channel)
        results: list[str] = []
        stop = threading.Event()

        def traffic(seed: int) -> None:
            while not stop.is_set():
                request = pb.TextToImageRequest(
                    prompt="x", params=pb.GenerationParams(seed=seed, num_inference_steps=4)
                )
                try:
                    stub.TextToImage(request, timeout=60)
                    results.append("OK")
                except grpc.RpcError as exc:
                    results.append(exc.code().name)

        clients = [threading.Thread(target=traffic, args=(seed,)) for seed in range(4)]
        for client in clients:
            client.start()
        wait_for(lambda: len(results) >= 12, what="steady traffic")
        # round_robin spreads the calls over both replicas (pick_first would send every one to the first)
        both = lambda: all("code=OK" in log.read_text() for log in (first_log, second_log))  # noqa: E731
        wait_for(both, what="both replicas serving calls")
        first.send_signal(signal.SIGTERM)
        wait_for(lambda: health_status(first_target, READINESS) != 1, what="readiness of the drained replica off")
        assert first.wait(timeout=60) == 0
        served_before = len(results)
        wait_for(lambda: len(results) >= served_before + 12, what="traffic after the drain")
        stop.set()
        for client in clients:
            client.join(60)
        channel.close()
        failures = [code for code in results if code != "OK"]
        assert not failures, f"{len(failures)} of {len(results)} calls failed: {sorted(set(failures))}"
        log = first_log.read_text()
        assert "GOAWAY" in log and "code=OK" in log
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_a_grace_period_that_runs_out_ends_the_call_with_unavailable_and_exits_0(store_home):
    process, target, log = start(store_home, "--drain-seconds", "0", "--grace-seconds", "1")
    try:
        wait_serving(target, process=process)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.DiffusionServiceStub(channel)
            long = pb.GenerationParams(seed=1, num_inference_steps=150, width=512, height=512)  # about 10 s here
            stream = stub.Stream(pb.StreamRequest(text_to_image=pb.TextToImageRequest(prompt="x", params=long)))
            assert next(stream).progress.step == 1  # running
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "grace period ran out" in caught.value.details()
        assert process.wait(timeout=60) == 0  # not 134: no abort at exit
    finally:
        if process.poll() is None:
            process.kill()
    lines = [line for line in log.read_text().splitlines() if "rpc=Stream" in line]
    assert len(lines) == 1 and "code=UNAVAILABLE" in lines[0], lines  # logged (and counted) as the client saw it
    assert "terminate called" not in log.read_text()
