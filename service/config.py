"""The server's configuration: one frozen object, built once at start-up from flags, environment and defaults.

Each field `x_y` is read from `DIFFUSERS_GRPC_X_Y` when its flag is not given on the command line. Most flags are
`--x-y`; `tags` are the positional TAG arguments, `reflection` is `--no-reflection`, and the request limits
`max_input_pixels` and the like that have no flag are set through their variables only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "DIFFUSERS_GRPC_"
DTYPES = ("auto", "float32", "float16", "bfloat16")
BATCHING = ("auto", "step", "request")


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

    def __post_init__(self) -> None:
        if not self.tags:
            raise ConfigError("serve needs at least one model tag")
        _check_range("port", self.port, 0, 65535)
        if self.metrics_port is not None:
            _check_range("metrics_port", self.metrics_port, 0, 65535)
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
        ):
            _check_range(name, getattr(self, name), 1, None)
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.max_image_size < 8 or self.max_image_size % 8:
            raise ConfigError(f"max_image_size must be a positive multiple of 8, got {self.max_image_size}")
        if self.batching not in BATCHING:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
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
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]


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
