"""The server's configuration: one frozen object, built once at start-up from flags, environment and defaults.

Each field `x_y` is read from `DIFFUSERS_GRPC_X_Y` when its flag is not given on the command line. Most flags are
`--x-y`; `tags` are the positional TAG arguments, `reflection` is `--no-reflection`, and the request limits
`max_input_pixels` and the like that have no flag are set through their variables only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "DIFFUSERS_GRPC_"
DTYPES = ("auto", "float32", "float16", "bfloat16")
BATCHING = ("auto", "step", "request")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what was given."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `serve` needs. Validated on construction."""

    tags: tuple[str, ...] = ("tiny-sd",)
    host: str = "[::]"
    port: int = 50051
    uds: str | None = None
    device: str = "auto"
    workers_per_device: int = 1
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 256
    metrics_port: int | None = None
    metrics_host: str | None = None  # where /metrics listens; None: the --host address
    store: str | None = None
    max_message_mb: int = 64
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    grace_seconds: float = 30.0
    drain_seconds: float = 5.0  # after SIGTERM: NOT_SERVING but still serving, so balancers and probes move away
    health_port: int | None = None  # a plaintext port serving only grpc.health.v1 (probes when the API needs TLS)
    health_host: str | None = None  # where the health port listens; None: the --host address
    max_connection_age_seconds: float = 300.0  # GOAWAY after this, so clients rebalance after a scale-out; 0: off
    keepalive_seconds: float = 60.0  # ping idle connections this often, to find dead peers; 0: off
    log_format: str = "text"
    log_level: str = "INFO"
    reflection: bool = True
    trust_remote_code: bool = False  # run the custom pipeline code a served model ships (the operator's call)
    allow_pickle: bool = False  # load pickle (.bin/.ckpt) weights of models stored with --allow-pickle
    dtype: str = "auto"  # auto, float32, float16 or bfloat16
    batching: str = "auto"  # auto, step or request
    adapters: tuple[str, ...] | None = None  # adapters to serve; None: every adapter of a served model
    compile: bool = False  # torch.compile the denoisers (CUDA only)
    max_image_size: int = 2048
    max_steps: int = 150
    max_images: int = 16
    max_input_pixels: int = 4096 * 4096
    max_pixel_steps: int = 2**31  # images x height x width x steps of one request (8 at 1024x1024 x 256 steps)
    max_prompt_chars: int = 4096  # each prompt, and each text argument of a Call
    max_queue_per_client: int | None = None  # a client's share of the queue while others wait; None: a quarter
    client_id_header: str | None = None  # metadata naming the client; None: the authenticated identity, else peer
    max_adapters_per_request: int = 8
    http_port: int | None = None  # the OpenAI-compatible Images API (service/http_api.py); None: off
    http_host: str | None = None  # where it listens; None: the --host address

    def __post_init__(self) -> None:
        if not self.tags:
            raise ConfigError("serve needs at least one model tag")
        _check_range("port", self.port, 0, 65535)
        for name in ("metrics_port", "health_port", "http_port"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0, 65535)
        for name in (
            "workers_per_device",
            "max_batch_size",
            "max_queue",
            "max_message_mb",
            "max_steps",
            "max_images",
            "max_input_pixels",
            "max_pixel_steps",
            "max_prompt_chars",
            "max_adapters_per_request",
        ):
            _check_range(name, getattr(self, name), 1, None)
        if self.max_queue_per_client is not None:
            _check_range("max_queue_per_client", self.max_queue_per_client, 1, self.max_queue)
        if self.client_id_header is not None and not re.fullmatch(r"[a-z0-9-]{1,64}", self.client_id_header):
            raise ConfigError(f"client_id_header must be a lower-case metadata key, got {self.client_id_header!r}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("grace_seconds", "drain_seconds", "max_connection_age_seconds", "keepalive_seconds"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_image_size < 8 or self.max_image_size % 8:
            raise ConfigError(f"max_image_size must be a positive multiple of 8, got {self.max_image_size}")
        if self.batching not in BATCHING:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        check_device(self.device)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.uds and not os.path.isdir(os.path.dirname(os.path.abspath(self.uds))):
            raise ConfigError(f"uds {self.uds!r}: its folder does not exist")
        if self.store and not (self.store.startswith("s3://") or os.path.isdir(os.path.expanduser(self.store))):
            raise ConfigError(f"store must be s3://bucket/prefix or a folder, got {self.store!r}")

    @property
    def metrics_address(self) -> str:
        """Where /metrics listens: --metrics-host, else the gRPC --host (without brackets)."""
        return self.metrics_host or self.host.strip("[]")

    @property
    def http_address(self) -> str:
        """Where the OpenAI-compatible HTTP API listens: --http-host, else the gRPC --host (without brackets)."""
        return self.http_host or self.host.strip("[]")

    @property
    def health_address(self) -> str:
        """Where the health-only port listens: --health-host, else the gRPC --host."""
        return self.health_host or self.host

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the API server.

        - `so_reuseport` off: otherwise a second server on a busy port binds too and the kernel splits the
          connections between the two.
        - `max_connection_age`: clients behind an L4 Service reconnect (and so rebalance) after a scale-out; its
          grace lets a call in flight finish, as a drain does.
        - keepalive: dead peers are found; clients may ping as often as every 10 s without being sent away.
        """
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.max_connection_age_seconds > 0:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.grace_seconds * 1000)),
            ]
        if self.keepalive_seconds > 0:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", 20_000),
            ]
        return options


def check_device(spec: str) -> None:
    """The syntax of --device (whether CUDA is there is asked when the server starts)."""
    for part in spec.lower().split(","):
        device = part.strip()
        if device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device):
            continue
        raise ConfigError(f"device: unknown device {part.strip()!r}; use auto, cpu, cuda or cuda:N[,cuda:M]")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def from_sources(flags: Mapping[str, object], environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config: a flag given on the command line wins, then its environment variable, then the default.

    `flags` holds only the flags the user gave (absent or None means not given).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in dataclasses.fields(ServerConfig):
        given = flags.get(f.name)
        if given is not None:
            values[f.name] = given
        elif env_name(f.name) in environ:
            values[f.name] = _parse_env(f, environ[env_name(f.name)])
    return ServerConfig(**values)  # type: ignore[arg-type]


def _parse_env(f: dataclasses.Field[object], raw: str) -> object:
    name = env_name(f.name)
    kind = str(f.type)
    try:
        if kind.startswith("tuple"):
            return tuple(part for part in raw.replace(",", " ").split() if part)
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw) if raw else None
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: cannot parse {raw!r} as {kind}") from None
    return raw or None


def _check_range(name: str, value: int, low: int, high: int | None) -> None:
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
