"""What a security probe found, each with its regression test: trust comes from the operator, never from data."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2
from helpers import ROOT, bad_request_fields, cli, free_port, health_status, wait_for
from inprocess import running_server
from PIL import Image

from model_store import IntegrityError, ModelStore, UntrustedCodeError
from model_store.archive import import_archive
from model_store.files import sha256_file
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

# Custom code that leaves a marker file when Python imports it: if the marker exists, the code ran.
EVIL = """
from pathlib import Path
from diffusers import StableDiffusionPipeline

Path({marker!r}).write_text("ran")


class EvilPipeline(StableDiffusionPipeline):
    pass
"""


def _archive(tmp_path: Path, store: ModelStore, options: dict, code: dict[str, str]) -> Path:
    """An archive of the demo model whose model.yaml carries `options` and which ships the files in `code`."""
    folder = tmp_path / "evil-model"
    shutil.copytree(store.get("tiny-sd").path, folder)
    info = yaml.safe_load((folder / "model.yaml").read_text())
    for name, text in code.items():
        (folder / name).write_text(text)
        info["files"][name] = {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
    info.update(name="evil", version="v1", pipeline_class="EvilPipeline", options=options)
    (folder / "model.yaml").write_text(yaml.safe_dump(info))
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                tar.add(file, arcname=file.relative_to(folder).as_posix())
    return path


def test_an_archive_cannot_grant_its_own_code_trust(store, tmp_path):
    marker = tmp_path / "ran-inside"
    archive = _archive(
        tmp_path,
        store,
        {"custom_pipeline": "pipeline.py", "trust_remote_code": True},
        {"pipeline.py": EVIL.format(marker=str(marker))},
    )
    target = ModelStore(tmp_path / "target")
    with pytest.raises(UntrustedCodeError, match="--trust-remote-code"):
        import_archive(target, archive)
    assert target.list_models() == [] and not marker.exists()

    # The operator accepts the archive; serving it still needs the operator's flag, whatever model.yaml says.
    model = import_archive(target, archive, trust_remote_code=True)
    assert not marker.exists()
    with pytest.raises(UntrustedCodeError, match="serve --trust-remote-code"):
        model.pipeline_type()
    assert not marker.exists()
    assert model.with_options(trust_remote_code=True).pipeline_type().__name__ == "EvilPipeline"
    assert marker.exists()  # trusted by the operator: now, and only now, it runs


def test_model_yaml_cannot_point_custom_code_outside_the_model(store, tmp_path):
    marker = tmp_path / "ran-outside"
    outside = tmp_path / "outside.py"
    outside.write_text(EVIL.format(marker=str(marker)))
    archive = _archive(tmp_path, store, {"custom_pipeline": str(outside), "trust_remote_code": True}, {})
    target = ModelStore(tmp_path / "target")
    with pytest.raises(UntrustedCodeError):
        import_archive(target, archive)
    with pytest.raises(IntegrityError, match=r"no listed pipeline\.py"):
        import_archive(target, archive, trust_remote_code=True)
    assert target.list_models() == [] and not marker.exists()


def test_serve_refuses_untrusted_code_before_opening_a_port(store, tmp_path):
    marker = tmp_path / "ran-at-serve"
    archive = _archive(tmp_path, store, {"custom_pipeline": "pipeline.py"}, {"pipeline.py": EVIL.format(marker=marker)})
    home = tmp_path / "home"
    import_archive(ModelStore(home), archive, trust_remote_code=True)
    port = free_port()
    result = subprocess.run(
        cli("serve", "evil", "--host", "127.0.0.1", "--port", str(port)),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "evil:v1" in result.stderr and "--trust-remote-code" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


# --- the rest of the probe's findings, each with its regression test ---------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def served(store, metrics_port):
    with running_server(store, max_images=4, max_image_size=512, metrics_port=metrics_port) as (server, target):
        yield server, target


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def call_with(client, arguments: dict, **kw) -> grpc.RpcError:
    return refused(lambda: client.call("__call__", {"prompt": "x", "num_inference_steps": 1, **arguments}, **kw))


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"num_images_per_prompt": 10000}, "arguments.num_images_per_prompt"),
        ({"height": 100000}, "arguments.height"),
        ({"num_inference_steps": 0}, "arguments.num_inference_steps"),
        ({"latents": [[0.0]]}, "arguments.latents"),
        ({"eta": float("nan")}, "arguments.eta"),
        ({"sigmas": [float("inf")]}, "arguments.sigmas"),
        # A list of prompts makes an image each: it counts against --max-images (4 here) like num_images does.
        ({"prompt": ["x"] * 64}, "arguments.prompt"),
        ({"prompt": ["x"] * 2, "num_images_per_prompt": 3}, "arguments.prompt"),
        ({"prompt": "x", "negative_prompt": ["y"] * 5}, "arguments.negative_prompt"),
        ({"prompt": ["x"] * 200_000}, "arguments.prompt"),
        # Keys of object arguments reach diffusers, which quotes unknown ones in a warning at every attention call.
        ({"cross_attention_kwargs": {"k" * 100_000: 1}}, "arguments.cross_attention_kwargs"),
        ({"cross_attention_kwargs": {"not_a_processor_key": 1}}, "arguments.cross_attention_kwargs"),
        ({"cross_attention_kwargs": {f"k{i}": 1 for i in range(1000)}}, "arguments.cross_attention_kwargs"),
    ],
)
def test_call_is_held_to_the_server_limits_and_refuses_what_json_cannot_be(served, client, arguments, field):
    error = call_with(client, arguments)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(error)
    assert health_status(served[1]) == SERVING


def test_a_list_prompt_within_the_limits_makes_one_image_per_prompt(client):
    reply = client.call("__call__", {"prompt": ["a", "b", "c"], "num_inference_steps": 1}, seed=3)
    assert len(reply.images) == 3


def test_the_lora_scale_is_the_one_cross_attention_key_a_call_may_pass(client):
    assert client.call("__call__", {"prompt": "x", "num_inference_steps": 1, "cross_attention_kwargs": {"scale": 0.5}})


def test_no_log_message_outgrows_its_bound():
    import logging as logging_module

    from service.telemetry import MAX_MESSAGE_CHARS, JsonFormatter, TextFormatter

    record = logging_module.LogRecord("diffusers", logging_module.WARNING, __file__, 1, "%s", ("k" * 10**6,), None)
    for formatter in (TextFormatter("%(message)s"), JsonFormatter()):
        line = formatter.format(record)
        assert len(line) < MAX_MESSAGE_CHARS + 200 and "more characters" in line


@pytest.mark.parametrize("arguments", [{"clip_skip": 1000}, {"clip_skip": 0}, {"cross_attention_kwargs": []}])
def test_call_arguments_the_pipeline_rejects_are_invalid_argument_not_internal(served, client, arguments):
    import re

    error = call_with(client, arguments)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    if "clip_skip" in arguments:  # the pipeline itself refuses these (validation cannot know the encoder's depth)
        # The library's own message (it can name files and settings) stays in the log: the client hears its kind.
        assert re.search(r"failed on these arguments \(\w+\)$", error.details()), error.details()
    assert health_status(served[1]) == SERVING


def test_a_huge_float_argument_stays_a_float(client):
    """1e308 was turned into an int, and the scheduler's arithmetic overflowed (INTERNAL): now it runs, and its
    non-finite result is the client's error (a garbage image is no answer)."""
    error = call_with(client, {"eta": 1e308})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in error.details()


def test_a_call_whose_output_is_not_finite_is_invalid_argument_not_garbage(client):
    """guidance_scale 1e308 passed every check and returned OK with a garbage image (the typed RPCs refuse it)."""
    error = call_with(client, {"guidance_scale": 1e308, "num_inference_steps": 2})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in error.details()


def test_call_with_an_image_argument_the_model_cannot_use_is_invalid_argument(client):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    error = refused(lambda: client.call("__call__", {"prompt": "x"}, images={"ip_adapter_image": png.getvalue()}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def _length_delimited(tag: int, payload: bytes) -> bytes:
    size, length = b"", len(payload)
    while True:
        size += bytes([(length & 0x7F) | (0x80 if length > 0x7F else 0)])
        length >>= 7
        if not length:
            return bytes([tag]) + size + payload


def test_a_struct_nested_deeper_than_protobuf_decodes_is_invalid_argument(served):
    """Written in the wire format by hand: the protobuf library itself refuses to build this message."""
    value = _length_delimited(0x1A, b"leaf")  # Value.string_value
    for _ in range(60):
        value = _length_delimited(0x32, _length_delimited(0x0A, value))  # Value.list_value(ListValue.values)
    entry = _length_delimited(0x0A, _length_delimited(0x0A, b"deep") + _length_delimited(0x12, value))
    body = _length_delimited(0x12, b"__call__") + _length_delimited(0x1A, entry)  # signature, arguments
    with grpc.insecure_channel(served[1]) as channel:
        call = channel.unary_unary("/diffusion.v1.DiffusionService/Call")
        error = refused(lambda: call(body, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(served[1]) as channel:
        garbage = refused(
            lambda: channel.unary_unary("/diffusion.v1.DiffusionService/TextToImage")(b"\xff\xff", timeout=30)
        )
    assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_invented_model_names_never_become_metric_labels_or_long_messages(served, client, metrics_port):
    names = [f"invented-{i}" for i in range(20)] + ["x" * 100_000, "bad\nname"]
    for name in names:
        error = refused(lambda name=name: client.stub.GetModel(pb.GetModelRequest(model=name), timeout=30))
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert len(error.details()) < 600
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    labels = {line.split('model="')[1].split('"')[0] for line in text.splitlines() if 'model="' in line}
    assert labels <= {"unknown", served[0].registry.default.tag}


def test_prompts_have_a_limit_and_are_never_echoed(client):
    error = refused(lambda: client.text_to_image("x" * 3_000_000, steps=1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in bad_request_fields(error)
    assert len(error.details()) < 600


def test_logs_escape_control_characters():
    from service.telemetry import TextFormatter

    line = TextFormatter("%(message)s").format(logging.LogRecord("x", 20, "", 0, "model=%s", ("a\nforged line",), None))
    assert "\n" not in line and "a\\nforged line" in line


@pytest.fixture
def server_logging():
    """The server's logging set up as `serve` does, its one handler writing to a buffer; undone afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from service.telemetry import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("json", "INFO")
    written = io.StringIO()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(written)
    yield written.getvalue
    root.handlers[:], root.level = saved
    logging.captureWarnings(False)
    for library in (diffusers_logging, transformers_logging):
        library.enable_default_handler()
        library.disable_propagation()
        library.enable_progress_bar()


def test_a_pipeline_truncating_a_long_prompt_never_writes_it_to_the_log(server_logging):
    """CLIP's truncation warning quotes the prompt, through diffusers' own handler: it wrote whole prompts into
    the server's log. Every library line now goes through the server's handler: formatted, and without them."""
    from model_store.demo import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.encode_prompt("a secret prompt " * 40, "cpu", 1, False)  # far past the 77 tokens CLIP reads
    logging.getLogger("diffusers.pipelines.x").warning("a library warning")
    written = server_logging()
    assert "secret" not in written
    lines = [json.loads(line) for line in written.splitlines()]  # every line is the server's JSON
    assert "a library warning" in {line["message"] for line in lines}


def test_a_json_log_line_is_never_a_string_a_client_chose():
    from service.telemetry import JsonFormatter

    forged = '{"event": "request", "code": "OK"}\n{"forged": true}'
    line = JsonFormatter().format(logging.LogRecord("diffusers", 30, "", 0, forged, None, None))
    assert json.loads(line)["message"] == forged  # quoted inside the server's own object, on one line


def test_a_status_the_call_ended_before_is_not_an_error_in_grpcs_log():
    """An item's deadline and the call's pass together: sending DEADLINE_EXCEEDED then fails inside grpc, which
    logged an ERROR with a traceback (operators page on those). The call has ended: nothing is left to send."""
    from batching.errors import DeadlineExceededError
    from service.servicer import abort

    class SendFailed(Exception):
        pass

    context = mock.Mock(time_remaining=lambda: -0.01, cancelled=lambda: False)
    context.abort = mock.AsyncMock(side_effect=SendFailed("execute_batch failed"))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort(context, DeadlineExceededError("deadline passed in the queue")))
    context.set_code.assert_called_once_with(grpc.StatusCode.DEADLINE_EXCEEDED)
    context.time_remaining = lambda: 5.0  # a live call whose status cannot be sent: a real error, raised
    context.abort.reset_mock()
    with pytest.raises(SendFailed):
        asyncio.run(abort(context, DeadlineExceededError("deadline passed in the queue")))


def test_an_rpc_that_ends_in_another_context_is_still_counted_out():
    """A cancelled stream's generator can be finalised in a new task, so the request scope's context variable
    cannot be reset there: the RPC must still leave the in-flight count (it leaked, and every drain then
    waited its whole grace period)."""
    import contextvars
    from unittest import mock

    from service.telemetry import Metrics, TelemetryInterceptor

    telemetry = TelemetryInterceptor(Metrics(), json_logs=False)
    context = mock.Mock(code=lambda: None)
    observation = telemetry._observe("Stream", {}, pb.StreamRequest(), context)
    contextvars.copy_context().run(observation.__enter__)  # begun in one context...
    assert telemetry.in_flight == 1
    observation.__exit__(None, None, None)  # ...ended in another
    assert telemetry.in_flight == 0
    assert telemetry.metrics.in_flight._value.get() == 0


def test_cancelled_streams_leave_no_request_counted_in_flight(served, client):
    server, _ = served
    for seed in range(12):
        request = pb.TextToImageRequest(prompt="x", params=pb.GenerationParams(seed=seed, num_inference_steps=40))
        stream = client.stub.Stream(pb.StreamRequest(text_to_image=request), timeout=60)
        assert next(stream).WhichOneof("event") == "progress"
        stream.cancel()
    wait_for(lambda: server.telemetry.in_flight == 0, what="every cancelled stream to be counted out")


def _codes(server, rpc: str) -> dict[str, float]:
    return {
        sample.labels["code"]: sample.value
        for metric in server.metrics.registry.collect()
        if metric.name == "diffusers_grpc_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["rpc"] == rpc
    }


def test_a_cancelled_stream_is_always_counted_cancelled_and_an_expired_deadline_deadline_exceeded(store):
    """14 of 200 cancelled Streams were counted UNKNOWN (paging operators), and deadlines that expired at the
    client were recorded as CANCELLED."""
    with running_server(store) as (server, target), DiffusionClient(target) as client:
        for seed in range(40):
            request = pb.TextToImageRequest(prompt="x", params=pb.GenerationParams(seed=seed, num_inference_steps=40))
            stream = client.stub.Stream(pb.StreamRequest(text_to_image=request), timeout=60)
            assert next(stream).WhichOneof("event") == "progress"  # the server has it: it must count it
            stream.cancel()
        wait_for(lambda: sum(_codes(server, "Stream").values()) == 40, what="every stream counted")
        assert _codes(server, "Stream") == {"CANCELLED": 40.0}
        slow = pb.TextToImageRequest(prompt="x", params=pb.GenerationParams(seed=1, num_inference_steps=150))
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                client.stub.TextToImage(slow, timeout=0.3)  # expires while it runs
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: sum(_codes(server, "TextToImage").values()) >= 3, what="the expired calls counted")
        assert _codes(server, "TextToImage") == {"DEADLINE_EXCEEDED": 3.0}


def test_a_count_over_its_limit_is_invalid_argument_before_the_reply_size_is_judged(client):
    """num_images 10000 used to be refused for the size of its reply (RESOURCE_EXHAUSTED): a value the client
    chose that breaks a documented limit is an invalid argument, named."""
    error = refused(lambda: client.text_to_image("x", steps=1, num_images=10000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.num_images" in bad_request_fields(error)


def test_the_pixel_budget_and_the_reply_size_are_checked_before_any_work(store):
    with running_server(store, max_pixel_steps=600_000, max_message_mb=1) as (server, target):
        with DiffusionClient(target) as client:
            budget = refused(lambda: client.text_to_image("x", steps=150))  # 64 x 64 x 150 = 614,400
            assert budget.code() == grpc.StatusCode.INVALID_ARGUMENT and "params" in bad_request_fields(budget)
            reply = refused(lambda: client.text_to_image("x", steps=1, width=512, height=512, num_images=2))
            assert reply.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in reply.details()
            # A Call's list of prompts counts the same: 3 prompts x 64 x 64 x 50 steps is over the budget, and
            # 3 prompts at 344 x 344 over the reply limit, although each prompt alone is within both.
            arguments = {"prompt": ["a", "b", "c"], "num_inference_steps": 50}
            listed = refused(lambda: client.call("__call__", arguments))
            assert listed.code() == grpc.StatusCode.INVALID_ARGUMENT and "arguments" in bad_request_fields(listed)
            arguments = {"prompt": ["a", "b", "c"], "num_inference_steps": 1, "height": 344, "width": 344}
            listed = refused(lambda: client.call("__call__", arguments))
            assert listed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in listed.details()
        assert server.stats.sizes == {}  # nothing ran


def test_refused_unauthenticated_calls_are_counted_and_logged_as_one_sampled_line_per_peer(store, caplog):
    caplog.set_level(logging.INFO)
    port = free_port()
    with running_server(store, auth_token="s3cret", metrics_port=port) as (_, target), DiffusionClient(target) as c:
        for _ in range(5):  # a guessing client: every attempt counted, one line said
            assert refused(lambda: c.list_models(timeout=30)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert refused(lambda: list(c.stream(pb.TextToImageRequest(prompt="x")))).code() == UNAUTHENTICATED

        def counted() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            lines = [line for line in text.splitlines() if line.startswith("diffusers_grpc_requests_total{")]
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'code="UNAUTHENTICATED"' in line)

        wait_for(lambda: counted() == 6, what="the six refused calls to be counted")
    lines = [r.getMessage() for r in caplog.records if "authentication" in r.getMessage()]
    assert len(lines) == 1 and "ipv4:127.0.0.1" in lines[0], lines
    assert not any("UNAUTHENTICATED" in r.getMessage() for r in caplog.records if r.name == "diffusers_grpc.requests")


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def test_a_peer_that_fails_too_often_is_refused_even_with_the_right_token_until_its_window_ends(store):
    with running_server(store, auth_token="s3cret") as (server, target):
        now = [0.0]
        server.auth.limiter._clock = lambda: now[0]
        with DiffusionClient(target, metadata={"authorization": "Bearer guess"}) as guessing:
            codes = [refused(lambda: guessing.list_models(timeout=30)).code() for _ in range(25)]
        assert codes[:21] == [UNAUTHENTICATED] * 21 and set(codes[21:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        with DiffusionClient(target, metadata={"authorization": "Bearer s3cret"}) as right:
            assert refused(lambda: right.list_models(timeout=30)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            now[0] = 11.0  # the window has ended
            assert right.list_models(timeout=30).models


def test_an_unauthenticated_call_is_refused_before_its_message_is_read(store_home, tmp_path):
    """8 parallel 48 MiB requests without a token: the server never holds their bodies (16 took RSS from 480 MB to
    1607 MB when it parsed them before refusing: 8 would add over 500 MB, well past the 200 MiB allowed)."""
    import psutil
    from helpers import wait_serving

    port = free_port()
    process = subprocess.Popen(
        cli("serve", "--host", "127.0.0.1", "--port", str(port), "--auth-token", "s3cret", "--drain-seconds", "0"),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(store_home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process=process)
        before = psutil.Process(process.pid).memory_info().rss
        big = pb.TextToImageRequest(prompt="x" * (48 << 20))
        with DiffusionClient(target) as client, ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(client.stub.TextToImage, big, timeout=60) for _ in range(8)]
            codes = {refused(call.result).code() for call in calls}
        grown = psutil.Process(process.pid).memory_info().rss - before
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert codes == {UNAUTHENTICATED}
    assert grown < 200 << 20, f"RSS grew by {grown >> 20} MiB"


def test_metrics_listen_on_the_server_host_unless_told_otherwise(served):
    address = served[0]._metrics_http.server_address[0]
    assert address == "127.0.0.1"


def test_sixteen_bit_and_rotated_images_decode_as_they_look():
    from service import imaging

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    data = io.BytesIO()
    Image.fromarray(ramp).save(data, format="PNG")
    decoded = np.asarray(imaging.decode(data.getvalue(), max_pixels=10**6))
    assert decoded.min() == 0 and decoded.max() == 255 and math.isclose(decoded.mean(), 127.5, abs_tol=1)
    sideways = Image.new("RGB", (40, 20))
    exif = sideways.getexif()
    exif[0x0112] = 6  # stored rotated; the camera says to turn it
    data = io.BytesIO()
    sideways.save(data, format="JPEG", exif=exif)
    assert imaging.decode(data.getvalue(), max_pixels=10**6).size == (20, 40)


def test_an_archive_that_would_unpack_into_gigabytes_is_refused_before_writing(store, tmp_path):
    import tarfile

    from model_store import StoreError

    manifest = yaml.safe_dump(
        {
            "name": "bomb",
            "version": "v1",
            "created": "",
            "pipeline_class": "X",
            "signatures": {},
            "files": {"zeros.bin": {"sha256": "0" * 64, "size": 4 << 30}},
        }
    ).encode()
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        head = tarfile.TarInfo("model.yaml")
        head.size = len(manifest)
        tar.addfile(head, io.BytesIO(manifest))
    target = ModelStore(tmp_path / "target")
    with pytest.raises(StoreError, match="over the limit"):
        import_archive(target, path, max_bytes=1 << 30)
    assert not any((tmp_path / "target" / ".tmp").iterdir())


def test_pickle_weights_are_refused_at_import_without_allow_pickle(store, tmp_path):
    from model_store import StoreError

    folder = tmp_path / "pickled"
    shutil.copytree(store.get("tiny-sd").path, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    target = ModelStore(tmp_path / "target")
    with pytest.raises(StoreError, match="pickle weights"):
        target.import_model("pickled", folder)
    assert target.list_models() == []


def test_a_bad_uds_path_exits_2_with_a_message(tmp_path):
    result = subprocess.run(
        cli("serve", "tiny-sd", "--uds", str(tmp_path / "no" / "such" / "dir" / "grpc.sock")),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "uds" in result.stderr and "Traceback" not in result.stderr
