"""Operations on a real in-process server: auth, TLS/mTLS, Unix socket, metrics, request ids and logs,
readiness during a slow load and during a drain, and a dying worker."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import ssl
import stat
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2
from helpers import READINESS, error_details, free_port, health_status, reason_of, wait_for
from inprocess import running_server

from service import servicer as servicer_module
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb
from service.workers import backend_factory

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def request(seed: int = 1, steps: int = 2) -> pb.TextToImageRequest:
    return pb.TextToImageRequest(prompt="x", params=pb.GenerationParams(seed=seed, num_inference_steps=steps))


# --- auth ------------------------------------------------------------------------------------------------------


def test_bearer_token_is_required_but_health_answers_without_it(store):
    with running_server(store, auth_token="s3cret") as (_, target):
        with DiffusionClient(target) as anonymous:
            with pytest.raises(grpc.RpcError) as caught:
                anonymous.stub.TextToImage(request(), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(caught.value) == "UNAUTHENTICATED"
            with pytest.raises(grpc.RpcError) as caught:
                list(anonymous.stub.Stream(pb.StreamRequest(text_to_image=request()), timeout=30))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with DiffusionClient(target, metadata={"authorization": "Bearer wrong"}) as wrong:
            with pytest.raises(grpc.RpcError) as caught:
                wrong.list_models(timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health_status(target) == SERVING
        with DiffusionClient(target, metadata={"authorization": "Bearer s3cret"}) as good:
            assert good.text_to_image("x", seed=1, steps=2, timeout=30).images
            assert [e.WhichOneof("event") for e in good.stream(request(), timeout=30)][-1] == "text_to_image"


def test_a_full_queue_answers_resource_exhausted_at_once(store):
    with running_server(store, max_queue=2) as (server, target), DiffusionClient(target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.text_to_image("x", seed=1, steps=2, num_images=3, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in caught.value.details()
        info, retry = error_details(caught.value)
        assert info.reason == "QUEUE_FULL" and retry.retry_delay.seconds >= 1
        assert len(server.executor.queue) == 0  # all or nothing: no image of it was queued
        assert client.text_to_image("x", seed=1, steps=2, num_images=2, timeout=30).images


# --- TLS ------------------------------------------------------------------------------------------------------


def _certificates(folder):
    """A test CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_name, issuer_key, *, ca=False, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        elif not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("test-ca", None, None, ca=True)
    server_key, server_cert = make("localhost", "test-ca", ca_key, server=True)
    client_key, client_cert = make("client", "test-ca", ca_key)
    paths = {}
    for name, key, cert in (
        ("ca", ca_key, ca_cert),
        ("server", server_key, server_cert),
        ("client", client_key, client_cert),
    ):
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths[name] = (folder / f"{name}.crt", folder / f"{name}.key")
    return paths


def test_tls_and_mtls(store, tmp_path):
    certs = _certificates(tmp_path)
    ca = certs["ca"][0].read_bytes()
    server_cert, server_key = (str(p) for p in certs["server"])
    with running_server(store, tls_cert=server_cert, tls_key=server_key, http_port=0) as (server, target):
        tls = grpc.ssl_channel_credentials(root_certificates=ca)
        with DiffusionClient(target, credentials=tls) as client:
            assert client.stub.TextToImage(request(), timeout=30).images
        with DiffusionClient(target) as plaintext, pytest.raises(grpc.RpcError):
            plaintext.list_models(timeout=5)
        # The OpenAI-compatible HTTP API takes the same certificate: HTTPS, and no plaintext
        trusting = ssl.create_default_context(cadata=ca.decode())
        with _openai(server, "https", trusting) as api:
            assert api.images.generate(prompt="x", extra_body={"seed": 1, "num_inference_steps": 2}).data
        with _openai(server, "http", None) as plain, pytest.raises(openai.APIConnectionError):
            plain.models.list()
    with running_server(
        store, tls_cert=server_cert, tls_key=server_key, tls_client_ca=str(certs["ca"][0]), http_port=0
    ) as (server, target):
        trusting = ssl.create_default_context(cadata=ca.decode())
        with _openai(server, "https", trusting) as api, pytest.raises(openai.APIConnectionError):
            api.models.list()  # mTLS: no client certificate, no call
        trusting.load_cert_chain(*(str(p) for p in certs["client"]))
        with _openai(server, "https", trusting) as api:
            assert api.models.list().data
        without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        with DiffusionClient(target, credentials=without_cert) as client, pytest.raises(grpc.RpcError) as caught:
            client.list_models(timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        client_cert, client_key = (p.read_bytes() for p in certs["client"])
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=client_key, certificate_chain=client_cert
        )
        with DiffusionClient(target, credentials=with_cert) as client:
            assert client.list_models(timeout=30).models


def _openai(server, scheme: str, context: ssl.SSLContext | None) -> openai.OpenAI:
    """The official client at the server's HTTP port, trusting `context`'s CAs (and presenting its certificate)."""
    http = httpx.Client(verify=context) if context is not None else httpx.Client()
    base = f"{scheme}://127.0.0.1:{server.http.port}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, http_client=http, timeout=30)


# --- Unix socket -----------------------------------------------------------------------------------------------


def test_the_cli_reaches_a_server_that_needs_mtls_and_a_token(store, tmp_path):
    import subprocess

    from helpers import cli

    certs = _certificates(tmp_path)
    (ca, _), (server_cert, server_key), (client_cert, client_key) = certs["ca"], certs["server"], certs["client"]
    secured = {"tls_cert": str(server_cert), "tls_key": str(server_key), "tls_client_ca": str(ca)}
    with running_server(store, auth_token="s3cret", **secured) as (_, target):
        tls = ["--target", f"localhost:{target.rsplit(':', 1)[1]}", "--tls-ca", str(ca)]
        mtls = [*tls, "--tls-cert", str(client_cert), "--tls-key", str(client_key)]

        def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
            environment = {**os.environ, **env}
            return subprocess.run(cli(*args), capture_output=True, text=True, timeout=120, env=environment)

        assert run("health", *mtls).returncode == 0  # health needs no token
        assert run("health", *tls).returncode == 2  # no client certificate: refused by mTLS
        out = tmp_path / "fox.png"
        denied = run("generate", "a fox", *mtls, "--steps", "2", "-o", str(out))
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        made = run("generate", "a fox", *mtls, "--steps", "2", "-o", str(out), DIFFUSERS_GRPC_TOKEN="s3cret")
        assert made.returncode == 0, made.stderr
        assert out.read_bytes().startswith(b"\x89PNG")
        by_flag = run("generate", "a fox", *mtls, "--token", "s3cret", "--steps", "2", "-o", str(out))
        assert by_flag.returncode == 0, by_flag.stderr


def test_tcp_and_unix_socket_serve_the_same_results(store, tmp_path):
    path = tmp_path / "grpc.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file left behind by a crashed server
    stale.close()
    with running_server(store, uds=str(path)) as (_, target):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with DiffusionClient(target) as tcp, DiffusionClient(f"unix:{path}") as local:
            over_tcp = tcp.stub.TextToImage(request(seed=5), timeout=30)
            over_uds = local.stub.TextToImage(request(seed=5), timeout=30)
        assert over_tcp.images[0].image.data == over_uds.images[0].image.data
    assert not path.exists()  # removed on exit


# --- metrics, request ids, logs --------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_and_fill_the_batch_histogram(store):
    port = free_port()
    with running_server(store, metrics_port=port) as (_, target), DiffusionClient(target) as client:

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

        before = scrape()
        assert _metric(before, "diffusers_grpc_models_loaded") == 1
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda s: client.stub.TextToImage(request(seed=s, steps=4), timeout=60), range(6)))
        with pytest.raises(grpc.RpcError):
            client.text_to_image("x", height=7)

        # The server counts an RPC just after its answer leaves, so scrape until the last one is in (bounded).
        def settled() -> str | None:
            text = scrape()
            done = _metric(text, "diffusers_grpc_requests_total") - _metric(before, "diffusers_grpc_requests_total")
            return text if done >= 7 and "diffusers_grpc_in_flight_requests 0.0" in text else None

        after = wait_for(settled, what="all seven RPCs counted")
    ok = 'diffusers_grpc_requests_total{code="OK",model="%s",rpc="TextToImage"}'
    assert _metric(after, "diffusers_grpc_requests_total") - _metric(before, "diffusers_grpc_requests_total") == 7
    assert 'code="INVALID_ARGUMENT"' in after
    assert ok.split("{")[0] in after
    assert _metric(after, "diffusers_grpc_batch_size_count") > _metric(before, "diffusers_grpc_batch_size_count")
    assert _metric(after, "diffusers_grpc_request_latency_seconds_count") >= 7
    assert _metric(after, "diffusers_grpc_queue_wait_seconds_count") >= 6
    # The tiny model serves on the step engine: its ticks have their own histogram, labelled with its tag.
    assert _metric(after, "diffusers_grpc_tick_seconds_count") >= 1
    assert _metric(after, "diffusers_grpc_inference_seconds_count") == 0
    assert "diffusers_grpc_in_flight_requests 0.0" in after and "diffusers_grpc_queue_depth 0.0" in after
    assert 'model=""' not in after  # every series names a served tag, or "unknown"
    images = _metric(after, "diffusers_grpc_images_total") - _metric(before, "diffusers_grpc_images_total")
    steps = _metric(after, "diffusers_grpc_denoising_steps_total") - _metric(
        before, "diffusers_grpc_denoising_steps_total"
    )
    assert (images, steps) == (6, 24)  # six images of four steps
    assert _metric(after, "process_resident_memory_bytes") > 0 and "python_info{" in after
    build = next(line for line in after.splitlines() if line.startswith("diffusers_grpc_build_info{"))
    assert 'device="cpu"' in build and 'diffusers="0.42' in build and build.endswith(" 1.0")


def test_request_id_is_echoed_and_logged_without_the_prompt(store, caplog):
    caplog.set_level(logging.INFO, logger="diffusers_grpc.requests")
    with running_server(store) as (_, target), DiffusionClient(target) as client:
        _, call = client.stub.TextToImage.with_call(
            pb.TextToImageRequest(prompt="a secret prompt", params=pb.GenerationParams(seed=1, num_inference_steps=2)),
            metadata=[("x-request-id", "req-42")],
            timeout=30,
        )
        assert ("x-request-id", "req-42") in call.trailing_metadata()
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.TextToImage(request(steps=0), metadata=[("x-request-id", "req-43")], timeout=30)
        assert ("x-request-id", "req-43") in caught.value.trailing_metadata()
        _, generated = client.stub.ListModels.with_call(pb.ListModelsRequest(), timeout=30)
        assert len(dict(generated.trailing_metadata())["x-request-id"]) == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusers_grpc.requests"]
    ok = next(line for line in lines if "request_id=req-42" in line)
    assert "code=OK" in ok and "rpc=TextToImage" in ok and "batch_size=1" in ok and "model=tiny-sd:" in ok
    assert "queue_ms=" in ok and "run_ms=" in ok
    assert any("request_id=req-43" in line and "code=INVALID_ARGUMENT" in line for line in lines)
    assert not any("secret" in line for line in lines)


# --- readiness -------------------------------------------------------------------------------------------------


def test_readiness_waits_for_a_slow_model_load(store):
    gate = threading.Event()

    def slow_factory(served, device, warmup):
        build = backend_factory(served, device, warmup)

        def slow():
            gate.wait(60)
            return build()

        return slow

    with running_server(store, wait=False, factory=slow_factory) as (server, target):
        assert health_status(target, READINESS) == NOT_SERVING
        assert health_status(target, "") == SERVING
        with DiffusionClient(target) as client, pytest.raises(grpc.RpcError) as caught:
            client.stub.TextToImage(request(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info, retry = error_details(caught.value)
        assert info.reason == "DRAINING" and retry.retry_delay.seconds >= 1  # not ready: try again, or elsewhere
        gate.set()
        server.loop_thread.run(server.wait_ready(60))
        assert health_status(target, READINESS) == SERVING


def test_drain_keeps_liveness_serving_and_serves_new_calls_during_its_window(store):
    with running_server(store) as (server, target), DiffusionClient(target) as client:
        events = client.stream(request(seed=3, steps=100), timeout=120)
        assert next(events).progress.step == 1  # the request is running
        stopping = server.loop_thread.run_async(server.stop(grace=60, drain=5))
        wait_for(lambda: health_status(target, READINESS) == NOT_SERVING, what="readiness turning off")
        assert health_status(target, "") == SERVING
        assert client.text_to_image("late", seed=1, steps=2, timeout=30).images  # a balancer's late call
        rest = list(events)
        assert rest[-1].WhichOneof("event") == "text_to_image"  # finished, not cancelled
        stopping.result(timeout=120)


def test_a_grace_that_runs_out_fails_the_rest_with_unavailable_counted_as_such(store):
    with running_server(store) as (server, target), DiffusionClient(target) as client:
        events = client.stream(request(seed=3, steps=150), timeout=120)
        long = pb.GenerationParams(seed=4, num_inference_steps=150, width=256, height=256)
        queued = client.stub.TextToImage.future(pb.TextToImageRequest(prompt="x", params=long), timeout=120)
        assert next(events).progress.step == 1  # running
        wait_for(lambda: server.telemetry.in_flight == 2, what="both calls on the server")
        stopping = server.loop_thread.run_async(server.stop(grace=0.5))
        with pytest.raises(grpc.RpcError) as streamed:
            list(events)
        with pytest.raises(grpc.RpcError) as unary:
            queued.result(timeout=60)
        stopping.result(timeout=60)
    for caught in (streamed, unary):
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info, retry = error_details(caught.value)
        assert info.reason == "WORKER_UNAVAILABLE" and retry is not None  # try another replica
    counted = {
        (sample.labels["rpc"], sample.labels["code"]): sample.value
        for metric in server.metrics.registry.collect()
        if metric.name == "diffusers_grpc_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["rpc"] in ("Stream", "TextToImage")
    }
    assert counted == {("Stream", "UNAVAILABLE"): 1.0, ("TextToImage", "UNAVAILABLE"): 1.0}, counted
    assert server.workers_stopped  # the worker left its step: nothing runs while the process exits


def test_a_health_only_port_answers_probes_in_plaintext_while_the_api_port_needs_tls(store, tmp_path):
    certs = _certificates(tmp_path)
    server_cert, server_key = (str(p) for p in certs["server"])
    with running_server(store, tls_cert=server_cert, tls_key=server_key, health_port=0) as (server, target):
        probe = f"127.0.0.1:{server.health_port}"
        assert health_status(probe, READINESS) == SERVING and health_status(probe, "") == SERVING
        assert health_status(target, READINESS) is None  # plaintext on the TLS port: no answer
        with DiffusionClient(probe) as plaintext, pytest.raises(grpc.RpcError) as caught:
            plaintext.list_models(timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # health only: the API is not there


def test_a_call_accepted_before_a_drain_is_served_even_if_it_was_still_validating(store, monkeypatch):
    validating, release = threading.Event(), threading.Event()
    validate = servicer_module.validation.generation

    def slow_validation(*args):
        validating.set()
        release.wait(60)
        return validate(*args)

    with running_server(store) as (server, target), DiffusionClient(target) as client:
        monkeypatch.setattr(servicer_module.validation, "generation", slow_validation)  # after the warm-up
        call = client.stub.TextToImage.future(request(seed=4), timeout=120)
        assert validating.wait(60)
        stopping = server.loop_thread.run_async(server.stop(grace=60))
        wait_for(lambda: health_status(target, READINESS) is None, what="the graceful stop refusing new calls")
        release.set()
        assert call.result(timeout=120).images  # not UNAVAILABLE: the queue stayed open until it was queued
        stopping.result(timeout=120)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker dies on purpose
def test_a_dying_worker_turns_readiness_off_and_fails_its_items(store):
    def fragile_factory(served, device, warmup):
        build = backend_factory(served, device, warmup)

        def fragile():
            worker = build()
            run_batch, join = worker.run_batch, worker.join

            def doomed(items):
                return any(
                    "die" in (item.inputs.get("prompt"), getattr(item.inputs.get("step"), "prompt", None))
                    for item in items
                )

            def fragile_run_batch(key, items, on_step):
                if doomed(items):
                    raise SystemExit("worker killed")
                return run_batch(key, items, on_step)

            def fragile_join(key, items):
                if doomed(items):
                    raise SystemExit("worker killed")
                return join(key, items)

            worker.run_batch, worker.join = fragile_run_batch, fragile_join
            return worker

        return fragile

    with running_server(store, factory=fragile_factory) as (_, target), DiffusionClient(target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.text_to_image("die", seed=1, steps=2, timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: health_status(target, READINESS) == NOT_SERVING, what="readiness turning off")
        with pytest.raises(grpc.RpcError) as caught:
            client.text_to_image("after", seed=1, steps=2, timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_watch_streams_are_bounded_per_peer(store):
    from grpc_health.v1 import health_pb2_grpc

    from service.security import MAX_WATCHES_PER_PEER

    with running_server(store) as (_, target), grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(MAX_WATCHES_PER_PEER)]
        assert all(next(watch).status == SERVING for watch in watches)  # each holds its stream open
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.Watch(health_pb2.HealthCheckRequest(service="")))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(caught.value) == "TOO_MANY_WATCHES"
        watches.pop().cancel()
        wait_for(lambda: _watch_opens(stub), what="a freed watch slot")
        for watch in watches:
            watch.cancel()


def _watch_opens(stub) -> bool:
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        return next(watch).status == SERVING
    except grpc.RpcError:
        return False
    finally:
        watch.cancel()


def test_health_list_answers_every_service_status(store):
    from grpc_health.v1 import health_pb2_grpc

    with running_server(store) as (_, target), grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    assert reply.statuses[""].status == SERVING
    assert reply.statuses["diffusion.v1.DiffusionService"].status == SERVING


def test_json_logs_carry_time_level_logger_message_and_the_request_id(store, caplog):
    """`--log-format json`: request lines and every other line alike, in RFC 3339 UTC time."""
    from service.telemetry import JsonFormatter, TextFormatter

    caplog.set_level(logging.INFO)
    with running_server(store, log_format="json") as (_, target), DiffusionClient(target) as client:
        client.stub.TextToImage(
            pb.TextToImageRequest(prompt="x", params=pb.GenerationParams(seed=1, num_inference_steps=2)),
            metadata=[("x-request-id", "req-77")],
            timeout=30,
        )
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in caplog.records]
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert stamp.fullmatch(line["time"]), line["time"]
    request = next(line for line in lines if line.get("request_id") == "req-77" and line["message"] == "request")
    assert (request["level"], request["logger"], request["code"]) == ("INFO", "diffusers_grpc.requests", "OK")
    # A line logged while a request is being served names it, in JSON and in text.
    from service import scope

    token = scope.current.set(scope.RequestScope("req-78", "TextToImage"))
    try:
        record = logging.LogRecord("diffusers", logging.WARNING, "", 0, "something odd", None, None)
        assert json.loads(formatter.format(record))["request_id"] == "req-78"
        assert TextFormatter("%(asctime)s %(message)s").format(record).endswith("something odd request_id=req-78")
    finally:
        scope.current.reset(token)


def test_reflection_serves_the_protos_comments_for_grpcurl_describe(store):
    import shutil
    import subprocess
    import sys

    grpcurl = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")
    with running_server(store) as (_, target):
        described = subprocess.run(
            [grpcurl, "-plaintext", target, "describe", "diffusion.v1.GenerationParams"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        health = subprocess.run(
            [grpcurl, "-plaintext", target, "describe", "grpc.health.v1.Health"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    assert "Denoising steps, 1 up to the server's maximum." in described  # the field's comment in the .proto
    assert "optional uint32 num_inference_steps = 1;" in described
    assert "rpc Check" in health  # the other services still resolve


def test_the_readmes_grpcurl_call_example_runs(store):
    """Call from any language: `arguments` is a Struct, which in JSON is a plain object."""
    import shutil
    import subprocess
    import sys

    grpcurl = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")
    body = '{"signature": "__call__", "arguments": {"prompt": "a fox", "num_inference_steps": 2}, "seed": "7"}'
    with running_server(store) as (_, target):
        reply = subprocess.run(
            [grpcurl, "-plaintext", "-d", body, target, "diffusion.v1.DiffusionService/Call"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    image = json.loads(reply)["images"][0]
    assert image["seed"] == "7" and image["image"]["mime_type"] == "image/png"  # the proto's own names
