"""A worker's device: inference mode, and on CUDA the worker's own stream, so replicas sharing a GPU overlap."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Device:
    """The device one worker runs on (`cpu`, `cuda:0`...)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stream: Any = None

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")

    @contextlib.contextmanager
    def running(self, *, synchronize: bool = True) -> Iterator[None]:
        """Run model code: no autograd, and on CUDA the worker's stream. With `synchronize` the stream is finished
        before the results are read on another thread; a denoising tick leaves it running (no host sync)."""
        import torch

        with torch.inference_mode():
            if not self.is_cuda:
                yield
                return
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.name)
            with torch.cuda.stream(self._stream):
                yield
            if synchronize:
                self._stream.synchronize()
