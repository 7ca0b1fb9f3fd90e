"""`diffusers-grpc generate PROMPT`: ask a running server for images and write them to files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CliError


def register(commands: Any) -> None:
    parser = commands.add_parser("generate", help="generate images with a running server")
    parser.add_argument("prompt")
    parser.add_argument("--target", default="localhost:50051", help="server address (default localhost:50051)")
    parser.add_argument("--model", default="", help="model tag (default: the server's default model)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: the server picks)")
    parser.add_argument("--steps", type=int, help="inference steps")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    parser.add_argument(
        "-o", "--output", default="out.png", help="output file; with several images, -1, -2... are appended"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from ..client import DiffusionClient

    with DiffusionClient(args.target) as client:
        try:
            response = client.text_to_image(
                args.prompt,
                model=args.model,
                negative_prompt=args.negative_prompt,
                seed=args.seed,
                steps=args.steps,
                guidance_scale=args.guidance,
                width=args.width,
                height=args.height,
                num_images=args.num_images,
                timeout=args.timeout,
            )
        except grpc.RpcError as exc:
            raise CliError(f"{exc.code().name}: {exc.details()}") from None
    for path, image in zip(output_paths(args.output, len(response.images)), response.images):
        path.write_bytes(image.image.data)
        print(f"wrote {path} ({image.image.width}x{image.image.height}, seed {image.seed}, model {response.model})")
    for warning in response.warnings:
        print(f"warning: {warning}")
    return 0


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
