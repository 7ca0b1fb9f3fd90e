"""The `diffusers-grpc` command line: `models ...`, `serve`, `generate`, `health`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import generate_cmd, health_cmd, models_cmd, serve_cmd
from .common import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-grpc", description="A gRPC inference service for Hugging Face diffusers pipelines."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models_cmd.register(commands)
    serve_cmd.register(commands)
    generate_cmd.register(commands)
    health_cmd.register(commands)
    return parser


def version() -> str:
    """The installed distribution's version (the source tree's when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("diffusers-grpc")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(  # `serve` replaces this with its own handler and the level it was given, once checked
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
