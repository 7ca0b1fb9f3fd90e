"""Property-based fuzzing of every DiffusionService RPC against a live in-process server (hypothesis).

Every request is sent as raw bytes, so anything a client of any language could send is fair game: a Struct nested
deeper than the Python protobuf library will build, NaN and Infinity inside Call arguments, corrupt wire bytes.
The properties, checked after every request:
- it ends in a documented status: OK, INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED, RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED or CANCELLED; never INTERNAL or UNKNOWN (nor UNAVAILABLE: nothing here drains the server);
- an error answer fits in gRPC's default client metadata limit (8 KiB): otherwise a client sees RESOURCE_EXHAUSTED
  instead of the server's answer;
- an OK answer parses and keeps what the API promises (image count, seed + i, requested size; for Stream,
  progress events then exactly one result of the request's kind);
- readiness (`diffusion.v1.DiffusionService`) is still SERVING.
test_call_respects_server_limits is stricter: Call arguments beyond the server's limits (size, steps, number of
images) must be refused, as the README says requests are validated before any work is queued.

Each distinct failure (status plus the server-side exception type and the line that raised it, taken from the
server's log) raises its own exception class, so one run reports, and shrinks, every distinct bug it met.

Accepted requests stay cheap: the server runs with max_image_size=256, max_images=4 and max_input_pixels=1024**2;
requests are valid and cheap (8..64 pixels, 1..3 steps) but for a few fields made hostile at a time.

Profiles (registered here): the default is short and derandomized, for `make test` (about 20-30 s on 2 idle
cores); FUZZ_PROFILE=long runs 300 random examples per test (it prints a seed/blob to replay a failure);
FUZZ_MAX_EXAMPLES=N overrides the count of either.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import random
import re
import struct
import threading
import traceback
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from inprocess import running_server
from PIL import Image

from service.generated.diffusion.v1 import diffusion_pb2 as pb

# --- profiles ----------------------------------------------------------------------------------------------------

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,  # nothing written into the checkout; failures print their example (and a blob in long runs)
    "suppress_health_check": list(HealthCheck),
}
# No "explain" phase: it reruns each failure hundreds of times, and a failure here costs a server round trip.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
settings.register_profile(
    "diffusers-grpc-fuzz", max_examples=25, derandomize=True, print_blob=False, phases=_PHASES, **_COMMON
)
settings.register_profile(
    "diffusers-grpc-fuzz-long", max_examples=300, derandomize=False, print_blob=True, phases=_PHASES, **_COMMON
)
_PROFILE = "diffusers-grpc-fuzz-long" if os.environ.get("FUZZ_PROFILE", "") == "long" else "diffusers-grpc-fuzz"
FUZZ = settings(
    settings.get_profile(_PROFILE),
    **({"max_examples": int(os.environ["FUZZ_MAX_EXAMPLES"])} if os.environ.get("FUZZ_MAX_EXAMPLES") else {}),
)

# --- the server under test ---------------------------------------------------------------------------------------

SERVICE = "/diffusion.v1.DiffusionService/"
READINESS = "diffusion.v1.DiffusionService"
MAX_IMAGE_SIZE, MAX_IMAGES, MAX_STEPS, MAX_INPUT_PIXELS = 256, 4, 150, 1024 * 1024
SERVER_LIMITS = {
    "max_image_size": MAX_IMAGE_SIZE,
    "max_images": MAX_IMAGES,
    "max_steps": MAX_STEPS,
    "max_input_pixels": MAX_INPUT_PIXELS,
}
TIMEOUT = 30.0  # seconds; ample for any cheap accepted request on 2 shared cores
DEFAULT_CLIENT_METADATA_LIMIT = 8192  # grpc's default soft limit on received metadata (headers + trailers)

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
RESPONSES = {
    "TextToImage": pb.TextToImageResponse,
    "ImageToImage": pb.ImageToImageResponse,
    "Inpaint": pb.InpaintResponse,
    "Call": pb.CallResponse,
    "Stream": pb.StreamResponse,
    "ListModels": pb.ListModelsResponse,
    "GetModel": pb.GetModelResponse,
}


class ServerLog(logging.Handler):
    """Collects the server's ERROR records (with their tracebacks) by the request id of the RPC that logged them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._records_lock = threading.Lock()
        self.by_request: dict[str | None, list[tuple[str, str]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:  # the servicer's request scope, a context variable set for the task serving the RPC
            from service import scope

            current = scope.get()
            request_id = current.request_id if current is not None else None
        except Exception:
            request_id = None
        where, text = record.getMessage(), record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)
            last = frames[-1] if frames else None
            place = f"{os.path.basename(last.filename)}:{last.lineno}" if last else "?"
            where = f"{type(exc).__name__} at {place}"
            text = "".join(traceback.format_exception(exc)[-6:])
        with self._records_lock:
            records = self.by_request.setdefault(request_id, [])
            records.append((where, text))
            del records[:-20]  # records no request claims (worker threads, grpc itself): keep the last few

    def take(self, request_id: str) -> list[tuple[str, str]]:
        with self._records_lock:
            return self.by_request.pop(request_id, [])

    def take_unscoped(self) -> list[tuple[str, str]]:
        with self._records_lock:
            return self.by_request.pop(None, [])


@dataclass
class Outcome:
    rpc: str
    code: grpc.StatusCode
    details: str = ""
    metadata_bytes: int = 0
    responses: list[Any] = field(default_factory=list)
    server_errors: list[tuple[str, str]] = field(default_factory=list)


_BUG_TYPES: dict[str, type[AssertionError]] = {}


def bug(key: str, message: str) -> AssertionError:
    """One exception class per distinct failure, so hypothesis reports (and shrinks) each separately."""
    kind = _BUG_TYPES.get(key)
    if kind is None:
        name = "ServerBug_" + re.sub(r"\W+", "_", key).strip("_")[:100]
        kind = _BUG_TYPES[key] = type(name, (AssertionError,), {"__module__": __name__})
    return kind(f"[{key}] {message}")


class Fuzzer:
    """A channel to the server under test that sends raw request bytes, so any message, even one the Python
    protobuf library refuses to build (a Struct nested deeper than its parser allows), can be sent."""

    def __init__(self, target: str, log: ServerLog) -> None:
        big = 4 << 20  # read oversized error trailers instead of dropping them, to measure and report them
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_metadata_size", big), ("grpc.absolute_max_metadata_size", big)]
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.log = log
        self.counter = 0
        self.unary = {
            name: self.channel.unary_unary(SERVICE + name, request_serializer=None, response_deserializer=None)
            for name in RESPONSES
            if name != "Stream"
        }
        self.stream = self.channel.unary_stream(SERVICE + "Stream", request_serializer=None, response_deserializer=None)

    def call(self, rpc: str, payload: bytes, timeout: float = TIMEOUT, cancel_after_first: bool = False) -> Outcome:
        self.counter += 1
        request_id = f"fuzz-{os.getpid()}-{self.counter}"
        metadata = (("x-request-id", request_id),)
        outcome = Outcome(rpc, grpc.StatusCode.OK)
        error: grpc.RpcError | None = None
        try:
            if rpc == "Stream":
                call = self.stream(payload, timeout=timeout, metadata=metadata)
                for message in call:
                    outcome.responses.append(message)
                    if cancel_after_first:
                        call.cancel()
            else:
                outcome.responses.append(self.unary[rpc](payload, timeout=timeout, metadata=metadata))
        except grpc.RpcError as exc:
            error = exc
        if error is not None:
            outcome.code = error.code()
            outcome.details = error.details() or ""
            trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
            outcome.metadata_bytes = len(outcome.details.encode()) + sum(
                len(k) + len(v if isinstance(v, bytes) else v.encode()) + 32 for k, v in trailers
            )
        outcome.server_errors = self.log.take(request_id)
        return outcome

    def check(self, outcome: Outcome) -> list[Any]:
        """Raise a `bug` for an undocumented status, an unreadable error, a failed parse or lost readiness;
        return the parsed responses."""
        rpc, code = outcome.rpc, outcome.code
        if currently_in_test_context():  # the parametrized tests below run outside hypothesis
            note(f"{rpc} -> {code.name} {outcome.details[:200]!r}")
            event(f"{rpc} -> {code.name}")  # pytest --hypothesis-show-statistics shows the mix of outcomes
        server_says = "\n".join(text for _, text in outcome.server_errors)
        if code not in DOCUMENTED:
            if outcome.server_errors:
                cause = outcome.server_errors[0][0]
            else:
                cause = re.sub(r"\d+", "N", re.sub(r"^Unexpected <class '([\w.]+)'>.*", r"\1", outcome.details))[:60]
            raise bug(
                f"{code.name} {cause}",
                f"{rpc} ended {code.name}: {outcome.details[:500]!r}\nserver log:\n{server_says or '(nothing logged)'}",
            )
        if code != grpc.StatusCode.OK and outcome.metadata_bytes > DEFAULT_CLIENT_METADATA_LIMIT:
            raise bug(
                f"oversized error trailers {code.name}",
                f"{rpc} ended {code.name} with {outcome.metadata_bytes} bytes of status and trailers: a client with "
                f"gRPC's default {DEFAULT_CLIENT_METADATA_LIMIT}-byte metadata limit cannot read this answer and "
                f"sees RESOURCE_EXHAUSTED instead. Details start {outcome.details[:200]!r}",
            )
        parsed = []
        for raw in outcome.responses:
            try:
                parsed.append(RESPONSES[rpc].FromString(raw))
            except Exception as exc:  # the server sent bytes its own API cannot parse
                raise bug(f"unparseable {rpc} response", f"{type(exc).__name__}: {exc}") from None
        self.assert_ready()
        return parsed

    def assert_ready(self) -> None:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=10)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            status = f"unreachable ({exc.code().name})"
        if status != "SERVING":
            unscoped = "\n".join(text for _, text in self.log.take_unscoped())
            raise bug("readiness lost", f"readiness is {status} after this request\nserver log:\n{unscoped}")


@pytest.fixture(scope="module")
def fuzz(store) -> Iterator[Fuzzer]:
    log = ServerLog()
    root = logging.getLogger()
    root.addHandler(log)
    # Hostile prompts make diffusers and transformers warn on every call: keep failure reports readable.
    quiet = {name: logging.getLogger(name).level for name in ("diffusers", "transformers")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with running_server(store, max_batch_size=4, **SERVER_LIMITS) as (_, target):
            fuzzer = Fuzzer(target, log)
            try:
                yield fuzzer
            finally:
                fuzzer.channel.close()
    finally:
        root.removeHandler(log)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


# --- hand-encoded protobuf (google.protobuf.Struct of any depth, NaN included) ------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


@dataclass(frozen=True)
class Nested:
    """A value nested `depth` levels deep in Structs (`{"k": {"k": ... leaf}}`) or ListValues (`[[... leaf]]`)."""

    depth: int
    kind: str = "struct"
    leaf: Any = 1.0

    def unwrap(self) -> Any:
        value = self.leaf
        for _ in range(self.depth):
            value = {"k": value} if self.kind == "struct" else [value]
        return value


def encode_value(value: Any) -> bytes:
    """A google.protobuf.Value: null 1, number 2, string 3, bool 4, struct 5, list 6."""
    if isinstance(value, Nested):  # encoded inside out, without Python recursion
        data = encode_value(value.leaf)
        for _ in range(value.depth):
            if value.kind == "struct":
                data = _length_delimited(
                    5, _length_delimited(1, _length_delimited(1, b"k") + _length_delimited(2, data))
                )
            else:
                data = _length_delimited(6, _length_delimited(1, data))
        return data
    if value is None:
        return _tag(1, 0) + _varint(0)
    if isinstance(value, bool):
        return _tag(4, 0) + _varint(int(value))
    if isinstance(value, (int, float)):
        return _tag(2, 1) + struct.pack("<d", float(value))
    if isinstance(value, str):
        return _length_delimited(3, value.encode())
    if isinstance(value, dict):
        return _length_delimited(5, encode_struct(value))
    if isinstance(value, (list, tuple)):
        return _length_delimited(6, b"".join(_length_delimited(1, encode_value(v)) for v in value))
    raise TypeError(f"not a Struct value: {value!r}")


def encode_struct(mapping: dict[str, Any]) -> bytes:
    return b"".join(
        _length_delimited(1, _length_delimited(1, key.encode()) + _length_delimited(2, encode_value(value)))
        for key, value in mapping.items()
    )


# --- hostile images ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ImageSpec:
    """How to make one input image; repr shows only what differs from the defaults, so examples read well."""

    kind: str = "image"  # image exif truncated bitflip random empty bomb_header bomb animated
    fmt: str = "PNG"
    mode: str = "RGB"
    width: int = 64
    height: int = 64
    seed: int = 0
    cut: float = 0.5
    flips: tuple[int, ...] = ()
    raw: bytes = b""
    orientation: int = 1
    mime: str = ""

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"ImageSpec({', '.join(shown)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' failure reports use this
        printer.text(repr(self))

    def proto(self) -> pb.Image:
        return pb.Image(data=image_bytes(self), mime_type=self.mime)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _picture(spec: ImageSpec) -> Image.Image:
    rng = random.Random(spec.seed)
    w, h = spec.width, spec.height
    if spec.mode == "I;16":  # a 16-bit PNG
        return Image.frombytes("I;16", (w, h), rng.randbytes(w * h * 2))
    base = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
    return base if spec.mode == "RGB" else base.convert(spec.mode)


def _save(picture: Image.Image, fmt: str, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        picture.save(buffer, format=fmt, **kw)
    except (OSError, ValueError, KeyError, TypeError):  # a mode this format cannot hold: as RGB
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def image_bytes(spec: ImageSpec) -> bytes:
    if spec.kind == "empty":
        return b""
    if spec.kind == "random":
        return spec.raw
    if spec.kind == "bomb_header":  # a valid PNG header claiming a huge (or zero) size, with no pixel data
        return _png(spec.width, spec.height, 2, zlib.compress(b""))
    if spec.kind == "bomb":  # a real, tiny PNG that decodes to width x height (at or near the pixel limit)
        rows = (b"\x00" + b"\x00" * spec.width) * spec.height
        return _png(spec.width, spec.height, 0, zlib.compress(rows, 9))
    if spec.kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = spec.orientation
        return _save(_picture(ImageSpec(width=spec.width, height=spec.height, seed=spec.seed)), "JPEG", exif=exif)
    if spec.kind == "animated":
        frames = [_picture(ImageSpec(width=spec.width, height=spec.height, seed=spec.seed + i)) for i in range(3)]
        return _save(frames[0], spec.fmt, save_all=True, append_images=frames[1:])
    data = _save(_picture(spec), spec.fmt)
    if spec.kind == "truncated":
        return data[: max(1, int(len(data) * spec.cut))]
    if spec.kind == "bitflip":
        mutable = bytearray(data)
        for position in spec.flips:
            mutable[position % len(mutable)] ^= 0xFF
        return bytes(mutable)
    return data


# --- strategies --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
CHARS = st.characters(codec="utf-8")  # any Unicode scalar, control characters included; no lone surrogates
MIMES = st.one_of(
    st.just(""),
    st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", "text/plain", "image/png\n"]),
    st.text(CHARS, max_size=20),
)
FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"]
DIMS = st.integers(1, 80)
HUGE_DIMS = [0, 1, 1025, 4097, 65535, 100_000, 2**31 - 1, 2**32 - 1]

HOSTILE_IMAGES = st.one_of(
    st.builds(
        ImageSpec,
        fmt=st.sampled_from(FORMATS),
        mode=st.sampled_from(MODES),
        width=DIMS,
        height=DIMS,
        seed=st.integers(0, 255),
        mime=MIMES,
    ),
    st.builds(ImageSpec, kind=st.just("exif"), width=DIMS, height=DIMS, orientation=st.integers(0, 9)),
    st.builds(
        ImageSpec,
        kind=st.just("truncated"),
        fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]),
        width=DIMS,
        height=DIMS,
        cut=st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99]),
    ),
    st.builds(
        ImageSpec,
        kind=st.just("bitflip"),
        fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]),
        flips=st.lists(st.integers(0, 10_000), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(ImageSpec, kind=st.just("random"), raw=st.binary(min_size=1, max_size=64), mime=MIMES),
    st.just(ImageSpec(kind="empty")),
    st.builds(
        ImageSpec, kind=st.just("bomb_header"), width=st.sampled_from(HUGE_DIMS), height=st.sampled_from(HUGE_DIMS)
    ),
    st.sampled_from(
        [
            ImageSpec(kind="bomb", width=1024, height=1024),  # exactly the pixel limit: accepted
            ImageSpec(kind="bomb", width=1024, height=1025),  # one row over
            ImageSpec(kind="bomb", width=1, height=MAX_INPUT_PIXELS),
        ]
    ),
    st.builds(
        ImageSpec, kind=st.just("animated"), fmt=st.sampled_from(["GIF", "PNG", "WEBP"]), width=DIMS, height=DIMS
    ),
)

FLOATS32 = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 7.5, -1.0, NAN, INF, -INF, 3.4e38, -3.4e38, 1e-45]),
    st.floats(width=32),
)
SEEDS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]))
ENUMS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))
SCHEDULER_NAMES = [  # diffusers' KarrasDiffusionSchedulers: what a Stable Diffusion model lists as compatible
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
]
PROMPTS = st.one_of(
    st.text(CHARS, max_size=40),
    st.sampled_from(["", "a fox", "\x00", "\n" * 50, "🦊" * 300, "a " * 400, "\u202e\u200b\ufeff"]),
    st.text(CHARS, min_size=200, max_size=3000),
)
MODEL_NAMES = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "tiny-sd",
            "tiny-sd:latest",
            "tiny-sd:2",
            "tiny-sd:",
            ":",
            "TINY-SD",
            "tiny-sd\n",
            " tiny-sd",
            "tiny-sd:latest:latest",
            "a" * 63,
            "a" * 64,
            "../etc/passwd",
            "tiny-sd:../../x",
            "no-such-model",
        ]
    ),
    st.text(CHARS, max_size=80),
    st.builds(lambda unit, n: unit * n, st.sampled_from(["a", "x\n", "é"]), st.integers(64, 6000)),
)
TIMEOUTS = st.sampled_from([TIMEOUT] * 8 + [0.001, 0.05])  # mostly ample; sometimes impossible
VALID_IMAGES = st.builds(
    ImageSpec,
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]),
    mode=st.sampled_from(MODES),
    width=st.integers(8, 64),
    height=st.integers(8, 64),
    seed=st.integers(0, 255),
)

# Each request field: a valid (and cheap) strategy and a hostile one. A case is a valid request with a few fields
# (none, often) made hostile: accepted requests stay common, and a failure shrinks to the one field that causes it.
# None means "not set" (the model's default).
TASK_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "model": (st.sampled_from(["", "tiny-sd", "tiny-sd:latest"]), MODEL_NAMES),
    "prompt": (st.text(CHARS, max_size=40), PROMPTS),
    "negative_prompt": (st.just(""), PROMPTS),
    "params": (st.just("set"), st.sampled_from([None, "empty"])),  # absent or empty: 50 steps, model size
    "num_inference_steps": (st.integers(1, 3), st.sampled_from([None, 0, MAX_STEPS + 1, 1000, 2**32 - 1])),
    "height": (
        st.sampled_from([8, 16, 32, 64]),
        st.sampled_from([None, 0, 1, 7, 9, 63, MAX_IMAGE_SIZE + 8, 2**31, 2**32 - 1]),
    ),
    "width": (
        st.sampled_from([8, 16, 32, 64]),
        st.sampled_from([None, 0, 1, 7, 9, 65, MAX_IMAGE_SIZE + 8, 2**31, 2**32 - 1]),
    ),
    "guidance_scale": (st.one_of(st.none(), st.floats(0, 20, width=32)), FLOATS32),
    "seed": (st.one_of(st.none(), SEEDS), SEEDS),
    "num_images": (st.integers(0, 2), st.sampled_from([MAX_IMAGES, MAX_IMAGES + 1, 10_000, 2**32 - 1])),
    "scheduler": (
        st.one_of(st.just(""), st.sampled_from(SCHEDULER_NAMES)),
        st.one_of(st.sampled_from(["LCMScheduler", "FlowMatchEulerDiscreteScheduler", "__class__"]), st.text(CHARS)),
    ),
    "eta": (st.sampled_from([None, 0.0, 0.5, 1.0]), FLOATS32),
    "output_format": (st.sampled_from([0, 1, 2, 3]), ENUMS),
    "quality": (st.one_of(st.none(), st.integers(1, 100)), st.sampled_from([0, 101, 2**31, 2**32 - 1])),
    "strength": (st.one_of(st.none(), st.floats(0.5, 1.0, width=32)), FLOATS32),
    "image": (VALID_IMAGES, st.one_of(HOSTILE_IMAGES, st.none())),
    "mask": (st.just("same"), st.one_of(HOSTILE_IMAGES, st.none())),
}
PARAM_FIELDS = (
    "num_inference_steps",
    "height",
    "width",
    "guidance_scale",
    "seed",
    "num_images",
    "scheduler",
    "eta",
    "output_format",
    "quality",
)


@dataclass(frozen=True)
class TaskCase:
    """A TextToImage, ImageToImage or Inpaint request, with its images as specs."""

    rpc: str
    model: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    params: dict[str, Any] | None = None
    strength: float | None = None
    image: ImageSpec | None = None
    mask: ImageSpec | None = None

    def message(self) -> Any:
        common: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "negative_prompt": self.negative_prompt}
        if self.params is not None:
            common["params"] = pb.GenerationParams(**self.params)
        if self.rpc == "TextToImage":
            return pb.TextToImageRequest(**common)
        if self.image is not None:
            common["image"] = self.image.proto()
        if self.strength is not None:
            common["strength"] = self.strength
        if self.rpc == "ImageToImage":
            return pb.ImageToImageRequest(**common)
        if self.mask is not None:
            common["mask_image"] = self.mask.proto()
        return pb.InpaintRequest(**common)


@st.composite
def task_cases(draw: st.DrawFn, rpc: str) -> TaskCase:
    names = [n for n in TASK_FIELDS if rpc != "TextToImage" or n not in ("strength", "image", "mask")]
    names = [n for n in names if rpc == "Inpaint" or n != "mask"]
    hostile = set(draw(st.lists(st.sampled_from(names), max_size=3, unique=True)))
    value = {name: draw(TASK_FIELDS[name][name in hostile]) for name in names}
    if rpc != "TextToImage" and "num_inference_steps" not in hostile:  # steps x strength must reach one step
        value["num_inference_steps"] = draw(st.integers(2, 3))
    params = {k: value[k] for k in PARAM_FIELDS if value[k] is not None}
    image = value.get("image")
    mask = value.get("mask")
    if mask == "same":  # a valid mask: the image's size
        small = image is not None and image.width * image.height <= 80 * 80
        mask = ImageSpec(mode="L", width=image.width, height=image.height) if small else ImageSpec(mode="L")
    return TaskCase(
        rpc=rpc,
        model=value["model"],
        prompt=value["prompt"],
        negative_prompt=value["negative_prompt"],
        params={"set": params, "empty": {}, None: None}[value["params"]],
        strength=value.get("strength"),
        image=image,
        mask=mask,
    )


# Hostile Struct values. Numbers a pipeline would turn into huge work (height 100000, 10000 images) are left to
# test_call_respects_server_limits, which sends them in their cheapest form.
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and +-Infinity included
    st.sampled_from([0, -1, 1e308, -1e308, 5e-324, 2**53 + 1, 2**63, 2**64, NAN, INF, -INF]),
    st.text(CHARS, max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(CHARS, max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
DEEP = st.builds(  # mostly within protobuf's nesting limit, so that other bugs are not all hidden behind that one
    Nested,
    depth=st.one_of(st.integers(1, 30), st.integers(1, 30), st.sampled_from([31, 32, 33, 34, 50, 64, 100, 200, 1000])),
    kind=st.sampled_from(["struct", "list"]),
    leaf=st.one_of(st.just(1.0), JSON_LEAVES),
)
HOSTILE = st.one_of(JSON_VALUES, JSON_VALUES, DEEP)
CHEAP_SIZE = st.one_of(st.sampled_from([8, 16, 32, 64]), st.sampled_from([0, -8, 7, 9, 1e308, 2**63, NAN, INF, -INF]))
ARGUMENT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(PROMPTS, st.lists(st.text(CHARS, max_size=10), max_size=3), HOSTILE),
    "negative_prompt": st.one_of(PROMPTS, HOSTILE),
    "height": CHEAP_SIZE,
    "width": CHEAP_SIZE,
    "num_inference_steps": st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 1.5, 1e308, 2**63, NAN, "2"])),
    "num_images_per_prompt": st.sampled_from([1, 2, 0, -1, 1.5, 1e308, 2**63, NAN, INF]),
    "guidance_scale": st.one_of(st.sampled_from([0, 1, 7.5, -1, 1e308, -1e308, NAN, INF, -INF]), st.floats()),
    "guidance_rescale": st.sampled_from([0, 0.7, 1, -1, 1e308, NAN, INF]),
    "eta": st.sampled_from([0, 1, -1, 1e308, NAN, INF, -INF]),
    "clip_skip": st.sampled_from([0, 1, 2, 1000, -1, -1000, 1e308, NAN]),
    "strength": st.sampled_from([0, 0.5, 1, -0.5, 2, 1e308, NAN, INF]),
    "padding_mask_crop": st.sampled_from([0, 1, 8, -1, 1e308, NAN]),
    "output_type": st.one_of(st.sampled_from(["latent", "pil", "np", "pt", "xyz", ""]), HOSTILE),
    "sigmas": st.one_of(st.lists(st.sampled_from([INF, NAN, 1.0, 0.0, -1.0, 1e308]), max_size=4), HOSTILE),
    "timesteps": st.one_of(st.lists(st.sampled_from([1, 999, 1000, -1, 1e308, NAN]), max_size=4), HOSTILE),
    "latents": st.one_of(st.lists(st.floats(), max_size=8), st.just([[[[0.0, 0.0]]]]), HOSTILE),
    "prompt_embeds": st.one_of(st.just([[[0.0, 0.0]]]), HOSTILE),
    "negative_prompt_embeds": HOSTILE,
    "ip_adapter_image": HOSTILE,
    "ip_adapter_image_embeds": HOSTILE,
    "masked_image_latents": HOSTILE,
    "image": HOSTILE,
    "mask_image": HOSTILE,
    "cross_attention_kwargs": st.one_of(st.dictionaries(st.sampled_from(["scale", "foo"]), JSON_LEAVES), HOSTILE),
    "callback_on_step_end_tensor_inputs": st.one_of(
        st.lists(st.sampled_from(["latents", "prompt_embeds", "foo", ""]), max_size=3), HOSTILE
    ),
    "generator": HOSTILE,  # reserved: the server sets these
    "return_dict": HOSTILE,
    "callback_on_step_end": HOSTILE,
}
IMAGE_ARGUMENT_NAMES = st.one_of(
    st.sampled_from(["image", "mask_image", "ip_adapter_image", "latents", "prompt"]), st.text(CHARS, max_size=8)
)


@dataclass(frozen=True)
class CallCase:
    """A Call request whose `arguments` Struct is encoded by hand (any depth, NaN and Infinity allowed)."""

    signature: str = "__call__"
    arguments: dict[str, Any] | None = None
    model: str = ""
    images: dict[str, ImageSpec] = field(default_factory=dict)
    seed: int | None = None
    output_format: int = 0

    def payload(self) -> bytes:
        message = pb.CallRequest(
            model=self.model,
            signature=self.signature,
            images={name: spec.proto() for name, spec in self.images.items()},
            output_format=self.output_format,  # type: ignore[arg-type]
        )
        if self.seed is not None:
            message.seed = self.seed
        data = message.SerializeToString()
        if self.arguments is not None:
            data += _length_delimited(3, encode_struct(self.arguments))
        return data


CALL_PARTS = ("arguments", "drop", "unknown_keys", "signature", "model", "images", "output_format", "no_arguments")


@st.composite
def call_cases(draw: st.DrawFn) -> CallCase:
    """A cheap valid Call of one of the model's three signatures, with a few parts made hostile."""
    signature = draw(st.sampled_from(["__call__", "img2img", "inpaint"]))
    arguments: dict[str, Any] = {
        "prompt": draw(st.text(CHARS, max_size=20)),
        "num_inference_steps": draw(st.integers(1, 3)),
        "output_type": draw(st.sampled_from(["latent", "pil", "np"])),
    }
    image_args: dict[str, ImageSpec] = {}
    if signature == "img2img":  # no height/width: the output takes the image's size
        image_args["image"] = draw(VALID_IMAGES)
        arguments["num_inference_steps"] = draw(st.integers(2, 3))
        arguments["strength"] = 1.0
    else:
        arguments["height"] = draw(st.sampled_from([8, 16, 32, 64]))
        arguments["width"] = draw(st.sampled_from([8, 16, 32, 64]))
    if signature == "inpaint":
        image = image_args["image"] = draw(VALID_IMAGES)
        image_args["mask_image"] = ImageSpec(mode="L", width=image.width, height=image.height)
    hostile = set(draw(st.lists(st.sampled_from(CALL_PARTS), max_size=3, unique=True)))
    if "arguments" in hostile:
        for name in draw(st.lists(st.sampled_from(sorted(ARGUMENT_VALUES)), min_size=1, max_size=3, unique=True)):
            arguments[name] = draw(ARGUMENT_VALUES[name])
    if "drop" in hostile:  # defaults: 50 steps, 64x64 from the model config, a PIL image
        for name in draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2, unique=True)):
            arguments.pop(name, None)
    if "unknown_keys" in hostile:
        arguments.update(draw(st.dictionaries(st.text(CHARS, max_size=12), HOSTILE, min_size=1, max_size=2)))
    if "images" in hostile:
        image_args.update(
            draw(st.dictionaries(IMAGE_ARGUMENT_NAMES, st.one_of(VALID_IMAGES, HOSTILE_IMAGES), min_size=1, max_size=2))
        )
    return CallCase(
        signature=draw(st.text(CHARS, max_size=20)) if "signature" in hostile else signature,
        arguments=draw(st.sampled_from([None, {}])) if "no_arguments" in hostile else arguments,
        model=draw(MODEL_NAMES) if "model" in hostile else "",
        images=image_args,
        seed=draw(st.one_of(st.none(), SEEDS)),
        output_format=draw(ENUMS) if "output_format" in hostile else 0,
    )


# --- contract checks on OK answers -------------------------------------------------------------------------------


def _check_images(case: TaskCase, reply: Any) -> None:
    params = case.params or {}
    expected = params.get("num_images") or 1
    if len(reply.images) != expected:
        raise bug("contract: image count", f"asked for {expected} images, got {len(reply.images)}")
    seed = params.get("seed")
    for index, generated in enumerate(reply.images):
        if seed is not None and generated.seed != (seed + index) % 2**64:
            raise bug("contract: seeds", f"image {index} has seed {generated.seed}, expected seed + {index}")
        with Image.open(io.BytesIO(generated.image.data)) as decoded:
            size = decoded.size
        if size != (generated.image.width, generated.image.height):
            raise bug("contract: image size fields", f"decoded {size}, message says {generated.image.width}x...")
        want = (params.get("width"), params.get("height"))
        if None not in want and size != want:
            raise bug("contract: requested size", f"asked for {want}, got {size}")


# --- the tests: one per RPC --------------------------------------------------------------------------------------


@FUZZ
@given(case=task_cases("TextToImage"), timeout=TIMEOUTS)
def test_text_to_image(fuzz: Fuzzer, case: TaskCase, timeout: float) -> None:
    (reply, *_) = fuzz.check(fuzz.call("TextToImage", case.message().SerializeToString(), timeout)) or [None]
    if reply is not None:
        _check_images(case, reply)


@FUZZ
@given(case=task_cases("ImageToImage"), timeout=TIMEOUTS)
def test_image_to_image(fuzz: Fuzzer, case: TaskCase, timeout: float) -> None:
    (reply, *_) = fuzz.check(fuzz.call("ImageToImage", case.message().SerializeToString(), timeout)) or [None]
    if reply is not None:
        _check_images(case, reply)


@FUZZ
@given(case=task_cases("Inpaint"), timeout=TIMEOUTS)
def test_inpaint(fuzz: Fuzzer, case: TaskCase, timeout: float) -> None:
    (reply, *_) = fuzz.check(fuzz.call("Inpaint", case.message().SerializeToString(), timeout)) or [None]
    if reply is not None:
        _check_images(case, reply)


@FUZZ
@given(case=call_cases(), timeout=TIMEOUTS)
def test_call(fuzz: Fuzzer, case: CallCase, timeout: float) -> None:
    fuzz.check(fuzz.call("Call", case.payload(), timeout))


# Seeds the generator reaches only by luck, each its own test (a failing hypothesis @example would stop the
# generated search of test_call). Cheap: 8x8, one step, latents out.
_CHEAP = {"prompt": "x", "num_inference_steps": 1, "height": 8, "width": 8, "output_type": "latent"}
HOSTILE_ARGUMENTS = {
    "nan-guidance": {"guidance_scale": NAN},
    "nan-unknown-key": {"no_such_argument": NAN},
    "infinity-unknown-key": {"no_such_argument": -INF},
    "nested-struct-40": {"cross_attention_kwargs": Nested(40)},
    "nested-struct-31": {"cross_attention_kwargs": Nested(31)},
    "nested-list-100": {"no_such_argument": Nested(100, "list")},
    "latents-list": {"latents": [[[[0.0]]]]},
    "sigmas-inf": {"sigmas": [INF]},
    "eta-1e308": {"eta": 1e308},
    "guidance-1e308": {"guidance_scale": 1e308},
    "guidance-rescale-1e308": {"guidance_rescale": 1e308},
    "clip-skip-1000": {"clip_skip": 1000},
    "steps-0": {"num_inference_steps": 0},
    "steps-negative": {"num_inference_steps": -1},
    "height-zero": {"height": 0},
    "height-1e308": {"height": 1e308},
    "images-per-prompt-1e308": {"num_images_per_prompt": 1e308},
    "prompt-embeds-list": {"prompt": None, "prompt_embeds": [[[0.0, 0.0]]]},
    "output-type-unknown": {"output_type": "xyz"},
    "ip-adapter-image-string": {"ip_adapter_image": "x"},
}


@pytest.mark.parametrize("extra", list(HOSTILE_ARGUMENTS.values()), ids=list(HOSTILE_ARGUMENTS))
def test_call_hostile_argument(fuzz: Fuzzer, extra: dict[str, Any]) -> None:
    arguments = {k: v for k, v in {**_CHEAP, **extra}.items() if v is not None}
    fuzz.check(fuzz.call("Call", CallCase(arguments=arguments).payload(), TIMEOUT))


# Arguments beyond the server's limits (README: sizes up to --max-image-size, steps and the number of images are
# validated before any work is queued), each in its cheapest form (8x8, one step, latents out), so that a server
# accepting one spends seconds, not the machine. (Guidance stays on: without it an 8x8 call fails in the UNet's
# GroupNorm with INVALID_ARGUMENT, which would pass this test for the wrong reason.)
OVER_LIMITS = {
    "height": {"height": MAX_IMAGE_SIZE + 8},
    "width": {"width": MAX_IMAGE_SIZE + 8},
    "height-100000": {"height": 100_000},
    "images-per-prompt": {"num_images_per_prompt": MAX_IMAGES + 1},
    "images-per-prompt-10000": {"num_images_per_prompt": 10_000},
    "steps": {"num_inference_steps": MAX_STEPS + 1},
}


@pytest.mark.parametrize("over", list(OVER_LIMITS.values()), ids=list(OVER_LIMITS))
def test_call_respects_server_limits(fuzz: Fuzzer, over: dict[str, Any]) -> None:
    arguments = {**_CHEAP, **over}
    outcome = fuzz.call("Call", CallCase(arguments=arguments).payload(), timeout=TIMEOUT)
    fuzz.check(outcome)
    assert outcome.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
        f"Call with {over} (server limits {SERVER_LIMITS}) ended {outcome.code.name}: it ran instead of being refused"
    )


@dataclass(frozen=True)
class StreamCase:
    inner: TaskCase | CallCase | None
    preview_every: int = 0
    cancel_after_first: bool = False

    def payload(self) -> bytes:
        tail = _tag(5, 0) + _varint(self.preview_every) if self.preview_every else b""
        if self.inner is None:
            return tail
        if isinstance(self.inner, CallCase):
            return _length_delimited(4, self.inner.payload()) + tail
        number = {"TextToImage": 1, "ImageToImage": 2, "Inpaint": 3}[self.inner.rpc]
        return _length_delimited(number, self.inner.message().SerializeToString()) + tail


RESULT_FIELD = {"TextToImage": "text_to_image", "ImageToImage": "image_to_image", "Inpaint": "inpaint"}


@FUZZ
@given(
    case=st.builds(
        StreamCase,
        inner=st.one_of(
            task_cases("TextToImage"), task_cases("ImageToImage"), task_cases("Inpaint"), call_cases(), st.none()
        ),
        preview_every=st.one_of(st.just(0), st.integers(1, 3), st.sampled_from([1000, 2**32 - 1])),
        cancel_after_first=st.booleans(),
    ),
    timeout=TIMEOUTS,
)
def test_stream(fuzz: Fuzzer, case: StreamCase, timeout: float) -> None:
    outcome = fuzz.call("Stream", case.payload(), timeout, cancel_after_first=case.cancel_after_first)
    events = fuzz.check(outcome)
    if outcome.code != grpc.StatusCode.OK:
        return
    kinds = [event.WhichOneof("event") for event in events]
    expected = "call" if isinstance(case.inner, CallCase) else RESULT_FIELD[case.inner.rpc] if case.inner else None
    if not kinds or kinds[-1] != expected or any(k != "progress" for k in kinds[:-1]):
        raise bug("contract: stream events", f"expected progress events then one {expected} result, got {kinds}")
    for message in events[:-1]:
        progress = message.progress
        if progress.total_steps and not 1 <= progress.step <= progress.total_steps:
            raise bug("contract: progress steps", f"step {progress.step} of {progress.total_steps}")


@FUZZ
@given(unknown=st.binary(max_size=64).map(lambda b: _length_delimited(99, b)), timeout=TIMEOUTS)
def test_list_models(fuzz: Fuzzer, unknown: bytes, timeout: float) -> None:
    """ListModelsRequest has no fields: fuzz it with unknown ones (which a parser must skip)."""
    replies = fuzz.check(fuzz.call("ListModels", unknown, timeout))
    if replies and not (replies[0].models and replies[0].models[0].tag.startswith("tiny-sd:")):
        raise bug("contract: ListModels", f"the default model is not listed first: {replies[0]}")


@FUZZ
@given(model=MODEL_NAMES, timeout=TIMEOUTS)
def test_get_model(fuzz: Fuzzer, model: str, timeout: float) -> None:
    replies = fuzz.check(fuzz.call("GetModel", pb.GetModelRequest(model=model).SerializeToString(), timeout))
    if replies and not replies[0].model.tag.startswith("tiny-sd:"):
        raise bug("contract: GetModel", f"{model!r} resolved to {replies[0].model.tag!r}")


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data or b"\x00")
    for position, value in edits:
        mutable[position % len(mutable)] = value
    return bytes(mutable)


VALID_WIRE = {
    "TextToImage": pb.TextToImageRequest(prompt="a fox", params={"num_inference_steps": 1, "height": 8, "width": 8}),
    "ImageToImage": pb.ImageToImageRequest(prompt="a fox", params={"num_inference_steps": 2, "height": 8, "width": 8}),
    "Inpaint": pb.InpaintRequest(prompt="a fox", params={"num_inference_steps": 1, "height": 8, "width": 8}),
    "Call": pb.CallRequest(signature="__call__"),
    "Stream": pb.StreamRequest(text_to_image={"params": {"num_inference_steps": 1, "height": 8, "width": 8}}),
    "ListModels": pb.ListModelsRequest(),
    "GetModel": pb.GetModelRequest(model="tiny-sd"),
}


@FUZZ
@given(
    rpc=st.sampled_from(sorted(RESPONSES)),
    data=st.one_of(
        st.binary(max_size=64),
        st.tuples(st.just(None), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4)),
        st.tuples(st.just(None), st.integers(0, 60)),
    ),
)
def test_wire_bytes(fuzz: Fuzzer, rpc: str, data: Any) -> None:
    """Arbitrary bytes on the wire: random, a valid request with bytes overwritten, or one cut short."""
    valid = VALID_WIRE[rpc].SerializeToString()
    if isinstance(data, bytes):
        payload = data
    elif isinstance(data[1], list):
        payload = _mutate(valid, data[1])
    else:
        payload = valid[: data[1]]
    note(f"payload={payload!r}")
    fuzz.check(fuzz.call(rpc, payload, TIMEOUT))


def test_hand_encoding_matches_protobuf() -> None:
    """The hand-written Struct encoder agrees with the protobuf library where the library can encode."""
    from google.protobuf import struct_pb2

    value = {"a": [1.0, "x", True, None, {"b": [[-2.5]]}], "": {}, "c": []}
    expected = struct_pb2.Struct()
    expected.update(value)
    assert struct_pb2.Struct.FromString(encode_struct(value)) == expected
    assert math.isnan(struct_pb2.Struct.FromString(encode_struct({"n": NAN}))["n"])
    nested = struct_pb2.Value.FromString(encode_value(Nested(5, "list", 3.0)))
    assert nested == struct_pb2.Value.FromString(encode_value(Nested(5, "list", 3.0).unwrap()))
