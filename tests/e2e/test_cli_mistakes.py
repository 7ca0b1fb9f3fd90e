"""A newcomer's mistakes: each gives one clear line and a non-zero exit (2 for usage and configuration, 1 for
runtime failures), never a traceback; a port in use is refused, not shared."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from helpers import ROOT, cli, free_port, server_process

pytestmark = pytest.mark.e2e


def run(home, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("serve", "--device", "tpu"), 2, "unknown device 'tpu'"),
        (("serve", "--log-level", "LOUD"), 2, "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (("serve", "--drain-seconds", "-1"), 2, "drain_seconds must be >= 0, got -1.0"),
        (("models", "import-archive", "/nonexistent/model.tar"), 1, "/nonexistent/model.tar: No such file"),
        (("serve", "no-such-model", "--port", "0"), 1, "mount a model store there"),
        (("generate", "x", "--tls-cert", "c.pem"), 2, "--tls-cert and --tls-key go together"),
        (("health", "--tls-ca", "/nonexistent/ca.pem"), 2, "--tls-ca /nonexistent/ca.pem: No such file"),
    ],
)
def test_a_mistake_is_one_line_and_an_exit_code(store_home, args, code, says):
    result = run(store_home, *args)
    assert result.returncode == code, result.stderr
    assert says in one_error_line(result)


def test_device_cuda_on_a_machine_without_cuda(store_home):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run(store_home, "serve", "--device", "cuda", "--port", "0")
    assert result.returncode == 2
    assert "--device cuda was given but no CUDA device is visible" in one_error_line(result)


def test_version():
    result = subprocess.run(cli("--version"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("diffusers-grpc 0.")


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--health-port", "--http-port"])
def test_a_port_in_use_is_refused_naming_it(store_home, flag):
    with socket.socket() as busy:  # someone else's listener: grpc's SO_REUSEPORT would have shared it
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--port": str(free_port()), flag: str(port)}
        args = [a for pair in ports.items() for a in pair]
        result = run(store_home, "serve", "--host", "127.0.0.1", *args)
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.endswith(f"{flag}: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "ready:" not in result.stderr


def test_a_second_server_on_a_busy_port_exits_instead_of_sharing_it(store_home):
    with server_process(store_home) as target:
        port = target.rsplit(":", 1)[1]
        result = run(store_home, "serve", "--host", "127.0.0.1", "--port", port)
    assert result.returncode == 2
    assert one_error_line(result).endswith(f"--port: cannot listen on 127.0.0.1:{port}: Address already in use")
