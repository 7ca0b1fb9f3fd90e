"""`diffusers-grpc serve TAG...`: run the gRPC server. Every flag also reads DIFFUSERS_GRPC_<FLAG>."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..config import ConfigError, env_name, from_sources
from ..ports import check_ports
from .common import CliError


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# (flag, config field, type, help). Defaults live in ServerConfig; the help shows the variable.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "TCP address to bind (default [::])"),
    ("--port", "port", int, "TCP port (default 50051; 0 picks a free one)"),
    ("--uds", "uds", str, "also listen on this Unix socket path"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:0,cuda:1 (default auto)"),
    ("--workers-per-device", "workers_per_device", int, "pipeline replicas per device (default 1)"),
    (
        "--max-batch-size",
        "max_batch_size",
        int,
        "most images in one pipeline call (default 8; 1 disables batching)",
    ),
    ("--max-wait-ms", "max_wait_ms", float, "longest a partial batch may wait for company (default 10)"),
    ("--max-queue", "max_queue", int, "most queued images before RESOURCE_EXHAUSTED (default 256)"),
    ("--metrics-port", "metrics_port", int, "serve Prometheus /metrics on this port"),
    ("--metrics-host", "metrics_host", str, "address /metrics listens on (default: the --host address)"),
    ("--store", "store", str, "model store: a folder or s3://bucket/prefix (default $DIFFUSERS_GRPC_HOME)"),
    ("--max-message-mb", "max_message_mb", int, "largest gRPC message in MiB, both directions (default 64)"),
    ("--tls-cert", "tls_cert", str, "PEM certificate chain: serve TLS"),
    ("--tls-key", "tls_key", str, "PEM private key for --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", str, "PEM CA bundle: require client certificates (mTLS)"),
    (
        "--auth-token",
        "auth_token",
        str,
        "require 'authorization: Bearer TOKEN' on every RPC but health/reflection",
    ),
    (
        "--drain-seconds",
        "drain_seconds",
        float,
        "after SIGTERM, keep serving this long with readiness NOT_SERVING, so load balancers move away "
        "(default 5; a SIGINT skips it)",
    ),
    (
        "--grace-seconds",
        "grace_seconds",
        float,
        "then stop gracefully (GOAWAY): calls in flight get this long to finish (default 30)",
    ),
    (
        "--health-port",
        "health_port",
        int,
        "also serve grpc.health.v1 alone, in plaintext, on this port (probes when the API port needs TLS)",
    ),
    ("--health-host", "health_host", str, "address the health port listens on (default: the --host address)"),
    (
        "--http-port",
        "http_port",
        int,
        "also serve the OpenAI-compatible Images API (/v1/images/generations, /v1/images/edits, /v1/models) over "
        "HTTP on this port: the same auth token, TLS, limits and queue as gRPC (default: off)",
    ),
    ("--http-host", "http_host", str, "address the HTTP API listens on (default: the --host address)"),
    (
        "--max-connection-age-seconds",
        "max_connection_age_seconds",
        float,
        "send clients GOAWAY after a connection is this old, so they rebalance after a scale-out (default 300; "
        "0 is off)",
    ),
    (
        "--keepalive-seconds",
        "keepalive_seconds",
        float,
        "ping idle connections this often to find dead peers (default 60; 0 is off)",
    ),
    ("--log-format", "log_format", str, "text or json (default text)"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING... (default INFO)"),
    ("--max-image-size", "max_image_size", int, "largest height/width a request may ask for (default 2048)"),
    ("--max-steps", "max_steps", int, "most inference steps a request may ask for (default 150)"),
    ("--max-images", "max_images", int, "most images per request (default 16)"),
    (
        "--max-pixel-steps",
        "max_pixel_steps",
        int,
        "most images x height x width x steps one request may ask for (default 2^31: 8 images at 1024x1024, 256 steps)",
    ),
    ("--max-prompt-chars", "max_prompt_chars", int, "longest prompt, and text argument of a Call (default 4096)"),
    (
        "--max-queue-per-client",
        "max_queue_per_client",
        int,
        "a client's share of the queue, in images, while others wait (default: a quarter of --max-queue)",
    ),
    (
        "--client-id-header",
        "client_id_header",
        str,
        "metadata key that names the client for its queue share (default: the mTLS identity, else the peer address)",
    ),
    (
        "--max-adapters-per-request",
        "max_adapters_per_request",
        int,
        "most LoRAs one request may name (default 8)",
    ),
    (
        "--batching",
        "batching",
        str,
        "auto, step or request (default auto: step-level batching for the batchable signatures of the models it "
        "supports, request batching elsewhere; step: for every signature it supports)",
    ),
    (
        "--adapters",
        "adapters",
        _names,
        "adapters to serve, by name (NAME,NAME...); default: every LoRA and embedding stored for a served model, "
        "and those added while it runs",
    ),
    (
        "--dtype",
        "dtype",
        str,
        "auto, float32, float16 or bfloat16 (default auto: float16 on CUDA, bfloat16 where the model asks for it, "
        "float32 on the CPU); wins over a dtype stored with the model",
    ),
]


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve models over gRPC",
        description="Serve stored models over gRPC. Each flag can also be set with the environment variable "
        "shown; a flag given on the command line wins.",
    )
    parser.add_argument(
        "tags",
        nargs="*",
        metavar="TAG",
        help=f"models to serve, the first is the default (env {env_name('tags')})",
    )
    for flag, field, kind, text in FLAGS:
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} [env {env_name(field)}]")
    parser.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=None,
        help=f"disable server reflection [env {env_name('reflection')}=false]",
    )
    parser.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile each model's denoiser and warm it before readiness; CUDA only "
        f"[env {env_name('compile')}=true]",
    )
    parser.add_argument(
        "--allow-pickle",
        dest="allow_pickle",
        action="store_true",
        default=None,
        help=f"load pickle (.bin) weights, which can run code [env {env_name('allow_pickle')}=true]",
    )
    parser.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        default=None,
        help=f"run the custom pipeline code a served model ships [env {env_name('trust_remote_code')}=true]",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    flags["tags"] = tuple(args.tags) or None
    try:
        config = from_sources(flags)
        check_ports(config)  # before torch and diffusers are imported: a busy port is said at once
    except ConfigError as exc:
        raise CliError(f"invalid configuration: {exc}", exit_code=2) from None
    from ..server import serve
    from ..telemetry import configure_logging

    configure_logging(config.log_format, config.log_level)
    from model_store import ModelNotFoundError, StoreError

    try:
        asyncio.run(serve(config))
    except ModelNotFoundError as exc:  # most often an empty store: say what to mount
        hint = (
            "mount a model store there (DIFFUSERS_GRPC_HOME), pull from one with --store s3://BUCKET/PREFIX, or "
            "import a model first (`diffusers-grpc models import` or `models create-demo`)"
        )
        raise CliError(f"cannot serve: {exc}; {hint}") from None
    except StoreError as exc:  # a model that cannot be served: say which and why, no traceback
        raise CliError(f"cannot serve: {exc}") from None
    except ConfigError as exc:  # a setting that does not fit the machine (--device cuda without CUDA, a busy port)
        raise CliError(f"invalid configuration: {exc}", exit_code=2) from None
    except RuntimeError as exc:  # a model that failed to load or warm up (its traceback is in the log above)
        raise CliError(f"cannot serve: {exc}") from None
    return 0
