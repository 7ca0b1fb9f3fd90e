"""`diffusers-grpc generate PROMPT`: ask a running server for images and write them to files.

No `--image`: TextToImage. `--image`: ImageToImage. `--image` and `--mask`: Inpaint. `--progress` runs the same
request through Stream and draws a progress bar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import CliError, add_connection_flags, connection


def register(commands: Any) -> None:
    parser = commands.add_parser("generate", help="generate images with a running server")
    parser.add_argument("prompt")
    add_connection_flags(parser)
    parser.add_argument("--model", default="", help="model tag (default: the server's default model)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--prompt-2", default="", help="prompt for SDXL's second text encoder")
    parser.add_argument("--negative-prompt-2", default="", help="negative prompt for SDXL's second text encoder")
    parser.add_argument("--prompt-3", default="", help="prompt for SD3's T5 encoder")
    parser.add_argument("--negative-prompt-3", default="", help="negative prompt for SD3's T5 encoder")
    parser.add_argument("--true-cfg", type=float, help="true CFG scale (FLUX, Qwen-Image; with --negative-prompt)")
    parser.add_argument(
        "--cache", type=_cache, help="feature cache: first_block:THRESHOLD or none (FLUX.1, Qwen-Image)"
    )
    parser.add_argument("--max-sequence-length", type=int, help="T5 prompt length in tokens (FLUX, SD3)")
    parser.add_argument(
        "--edit",
        type=Path,
        action="append",
        default=[],
        help="a reference image to edit by instruction (the Edit RPC); repeat for models that take several",
    )
    parser.add_argument(
        "--control-image",
        type=Path,
        action="append",
        default=[],
        help="a ControlNet conditioning image; repeat once per ControlNet of the model",
    )
    parser.add_argument("--image", type=Path, help="input image: image-to-image (with --mask: inpainting)")
    parser.add_argument("--mask", type=Path, help="inpainting mask: white is repainted (needs --image)")
    parser.add_argument("--strength", type=float, help="how much to change the input image, 0-1")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: the server picks)")
    parser.add_argument("--steps", type=int, help="inference steps")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="apply a LoRA stored for the model (ModelInfo.adapters) at WEIGHT (default 1); repeatable",
    )
    parser.add_argument("--scheduler", default="", help="a scheduler class name listed by the server's GetModel")
    parser.add_argument("--format", default="png", choices=("png", "jpeg", "webp"), help="output format")
    parser.add_argument("--quality", type=int, help="JPEG/WebP quality 1-100")
    parser.add_argument("--progress", action="store_true", help="stream step progress and draw a progress bar")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output file (default out.<format>); with several images -1, -2... are appended",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from ..client import DiffusionClient, params
    from ..generated.diffusion.v1 import diffusion_pb2 as pb

    if args.mask and not args.image:
        raise CliError("--mask needs --image")
    if args.edit and (args.image or args.strength is not None or args.control_image or args.prompt_2):
        raise CliError("--edit takes none of --image, --mask, --strength, --control-image, --prompt-2")
    settings = params(
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        scheduler=args.scheduler,
        output_format=args.format,
        quality=args.quality,
        adapters=dict(_lora(text) for text in args.lora),
        true_cfg_scale=args.true_cfg,
        max_sequence_length=args.max_sequence_length,
        cache=args.cache,
    )
    common = {"model": args.model, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "params": settings}
    request: Any
    if args.edit:
        request = pb.EditRequest(**common, images=[pb.Image(data=_read(path)) for path in args.edit])
    elif args.image is None:
        request = pb.TextToImageRequest(**common)
    elif args.mask is None:
        request = pb.ImageToImageRequest(**common, image=pb.Image(data=_read(args.image)))
    else:
        request = pb.InpaintRequest(
            **common, image=pb.Image(data=_read(args.image)), mask_image=pb.Image(data=_read(args.mask))
        )
    if args.strength is not None:
        if args.image is None:
            raise CliError("--strength needs --image")
        request.strength = args.strength
    if not args.edit:
        request.prompt_2, request.negative_prompt_2 = args.prompt_2, args.negative_prompt_2
        request.prompt_3, request.negative_prompt_3 = args.prompt_3, args.negative_prompt_3
        request.control_images.extend(pb.Image(data=_read(path)) for path in args.control_image)
    where = connection(args)
    with DiffusionClient(where.target, credentials=where.credentials, metadata=where.metadata) as client:
        try:
            if args.progress:
                response = _stream_with_bar(client, request, args.timeout)
            else:
                response = client.send(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise CliError(f"{exc.code().name}: {exc.details()}") from None
    output = args.output or f"out.{'jpg' if args.format == 'jpeg' else args.format}"
    for path, generated in zip(output_paths(output, len(response.images)), response.images):
        path.write_bytes(generated.image.data)
        size = f"{generated.image.width}x{generated.image.height}"
        print(f"wrote {path} ({size}, seed {generated.seed}, model {response.model})")
    for warning in response.warnings:
        print(f"warning: {warning}")
    return 0


def _stream_with_bar(client: Any, request: Any, timeout: float) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", file=sys.stderr, disable=not sys.stderr.isatty())
    result = None
    try:
        for event in client.stream(request, timeout=timeout):
            kind = event.WhichOneof("event")
            if kind == "progress":
                bar.total = event.progress.total_steps
                bar.n = event.progress.step
                bar.refresh()
            else:
                result = getattr(event, kind)
    finally:
        bar.close()
    if result is None:
        raise CliError("the stream ended without a result")
    return result


def _lora(text: str) -> tuple[str, float]:
    name, _, weight = text.partition(":")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise CliError(f"--lora {text!r}: the weight must be a number, as in NAME:0.8") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def _cache(text: str) -> str:
    """`first_block:THRESHOLD` or `none`, checked here so that a typo is a usage error, not a request."""
    from model_store.errors import StoreError
    from model_store.options import cache_threshold

    try:
        cache_threshold(text)
    except StoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
