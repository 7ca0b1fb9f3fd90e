"""A small Python client for DiffusionService, over a channel configured like the server (64 MiB messages)."""

from __future__ import annotations

from types import TracebackType

import grpc

from .generated.diffusion.v1 import diffusion_pb2 as pb
from .generated.diffusion.v1 import diffusion_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_MB = 64


class DiffusionClient:
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(self, target: str, *, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> None:
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.DiffusionServiceStub(self.channel)

    def __enter__(self) -> DiffusionClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def text_to_image(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str = "",
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        output_format: int = pb.OUTPUT_FORMAT_PNG,
        timeout: float | None = None,
    ) -> pb.TextToImageResponse:
        params = pb.GenerationParams(num_images=num_images, output_format=output_format)  # type: ignore[arg-type]
        for name, value in (
            ("seed", seed),
            ("num_inference_steps", steps),
            ("guidance_scale", guidance_scale),
            ("width", width),
            ("height", height),
        ):
            if value is not None:
                setattr(params, name, value)
        request = pb.TextToImageRequest(model=model, prompt=prompt, negative_prompt=negative_prompt, params=params)
        return self.stub.TextToImage(request, timeout=timeout)

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
