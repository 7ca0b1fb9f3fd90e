"""First Block Cache per row, inside one batched transformer call of the step engine.

diffusers' `apply_first_block_cache` decides once per forward call, over the whole batch tensor, and keeps one
state per cache context ("cond", "uncond") on the module. Rows of a continuous batch belong to different
requests at different steps, so here each row carries its own state (`RowCache`, kept in its item's track) and
gets its own decision, with diffusers' measure and threshold semantics:

- the head block (the first block of the transformer's block lists) runs over every row;
- a row whose head residual moved, relative to its own previous one, by `mean|r - r_prev| / mean|r_prev|` no more
  than its threshold reuses its cached tail residual: the remaining blocks skip it;
- the remaining blocks run only over the other rows (a gathered sub-batch), which refresh their state.

The pipelines that take diffusers' hook call the transformer once per cache context, one row each (FLUX's and
Qwen-Image's conditional and true-CFG negative passes), so a row here is exactly one of diffusers' contexts.
Pipelines that set no cache context (SD3, Z-Image, FLUX image-to-image, Kontext) cannot run diffusers' hook, and
are not offered the cache.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

FIRST_BLOCK = "first_block"
NO_CACHE = "none"
# Pipelines whose `__call__` wraps each transformer call in `cache_context`, the ones diffusers' hook runs in.
CACHEABLE_PIPELINES = frozenset({"FluxPipeline", "QwenImagePipeline", "QwenImageImg2ImgPipeline"})
# Block inputs with one entry per row; the others (rotary embeddings, attention kwargs) are shared by the call.
_PER_ROW_INPUTS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb")


@dataclass
class RowCache:
    """One row's First Block Cache state: diffusers' `FBCSharedBlockState` for one cache context."""

    threshold: float
    head_residual: Any = None  # the head block's output minus its input, at the row's last full step
    tail_residuals: tuple[Any, Any] | None = None  # (hidden, encoder) tail output minus head output, then
    reused_last: bool = False  # whether the row's last step skipped the remaining blocks

    def should_compute(self, residual: Any) -> bool:
        """diffusers' `_should_compute_remaining_blocks`, for this row alone."""
        if self.head_residual is None:
            return True
        previous = self.head_residual
        change = ((residual - previous).abs().mean() / previous.abs().mean()).item()
        return bool(change > self.threshold)


@dataclass
class _Call:
    """What the head block decided, for the blocks after it in the same forward call."""

    caches: Sequence[RowCache | None]
    narrowed: Callable[[Sequence[int]], contextlib.AbstractContextManager[None]]
    compute: list[bool] = field(default_factory=list)
    head_hidden: Any = None
    head_encoder: Any = None

    @property
    def rows(self) -> list[int]:
        return [i for i, compute in enumerate(self.compute) if compute]


def transformer_blocks(transformer: Any) -> list[Any]:
    """The transformer's blocks in forward order, as diffusers' hook finds them."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [
        block
        for name, child in transformer.named_children()
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
        for block in child
    ]


@contextlib.contextmanager
def first_block_cache(
    pipe: Any,
    caches: Sequence[RowCache | None],
    narrowed: Callable[[Sequence[int]], contextlib.AbstractContextManager[None]] | None = None,
) -> Iterator[None]:
    """Within the block, a call of `pipe.transformer` in which row i uses `caches[i]` (None: always in full);
    nothing changes when no row has a cache. `narrowed(rows)` is entered around every sub-batch call (per-row
    LoRAs follow their rows)."""
    if not any(cache is not None for cache in caches):
        yield
        return
    blocks = transformer_blocks(pipe.transformer)
    if len(blocks) < 2:  # no tail to skip (diffusers' hook refuses such a model too): every row in full
        yield
        return
    call = _Call(caches, narrowed or (lambda rows: contextlib.nullcontext()))
    wrapped = [(blocks[0], _head(blocks[0], call))]
    wrapped += [(block, _rest(block, call, tail=False)) for block in blocks[1:-1]]
    wrapped.append((blocks[-1], _rest(blocks[-1], call, tail=True)))
    for block, forward in wrapped:
        block.forward = forward
    try:
        yield
    finally:
        for block, _ in wrapped:
            del block.forward  # back to the class's forward


def _indices(block: Any) -> tuple[int, int]:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    metadata = TransformerBlockRegistry.get(type(block))
    return metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index


def _bind(block: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
    return {name: value for name, value in bound.arguments.items() if name != "self"}


def _pair(hidden_index: int, encoder_index: int, hidden: Any, encoder: Any) -> tuple[Any, ...]:
    output: list[Any] = [None, None]
    output[hidden_index], output[encoder_index] = hidden, encoder
    return tuple(output)


def _head(block: Any, call: _Call) -> Callable[..., Any]:
    original = type(block).forward
    hidden_index, encoder_index = _indices(block)

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs = _bind(block, args, kwargs)
        output = original(block, **inputs)
        hidden, encoder = output[hidden_index], output[encoder_index]
        residual = hidden - inputs["hidden_states"]
        call.compute = []
        for row, cache in enumerate(call.caches):
            compute = cache is None or cache.should_compute(residual[row : row + 1])
            if cache is not None and compute:  # a copy: a view would keep the whole call's tensor alive
                cache.head_residual = residual[row : row + 1].clone()
            call.compute.append(compute)
        call.head_hidden, call.head_encoder = hidden, encoder
        return output

    return forward


def _rest(block: Any, call: _Call, tail: bool) -> Callable[..., Any]:
    """A block after the head: run over the computing rows only; the others pass through (and at the tail, get
    their cached residuals on the head block's output, as diffusers' head hook returns them)."""
    import torch

    original = type(block).forward
    hidden_index, encoder_index = _indices(block)

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs = _bind(block, args, kwargs)
        hidden, encoder = inputs["hidden_states"], inputs["encoder_hidden_states"]
        rows = call.rows
        if rows:
            if len(rows) == len(call.compute):
                output = original(block, **inputs)
                hidden, encoder = output[hidden_index], output[encoder_index]
            else:
                index = torch.tensor(rows, device=hidden.device)
                subset = {
                    name: value.index_select(0, index) if name in _PER_ROW_INPUTS and value is not None else value
                    for name, value in inputs.items()
                }
                with call.narrowed(rows):
                    output = original(block, **subset)
                hidden, encoder = (
                    hidden.index_copy(0, index, output[hidden_index]),
                    encoder.index_copy(0, index, output[encoder_index]),
                )
        if tail:
            hidden, encoder = _finish(call, hidden, encoder)
        return _pair(hidden_index, encoder_index, hidden, encoder)

    return forward


def _finish(call: _Call, hidden: Any, encoder: Any) -> tuple[Any, Any]:
    """Store the computing rows' tail residuals; give the skipping rows head output + cached residual."""
    import torch

    hidden_rows, encoder_rows = list(hidden.unbind(0)), list(encoder.unbind(0))
    for row, (cache, compute) in enumerate(zip(call.caches, call.compute)):
        if cache is None:
            continue
        if compute:
            cache.tail_residuals = (
                hidden[row : row + 1] - call.head_hidden[row : row + 1],
                encoder[row : row + 1] - call.head_encoder[row : row + 1],
            )
            cache.reused_last = False
        else:
            assert cache.tail_residuals is not None
            hidden_rows[row] = (cache.tail_residuals[0] + call.head_hidden[row : row + 1])[0]
            text = _fit(cache.tail_residuals[1], call.head_encoder.shape[1])
            encoder_rows[row] = (text + call.head_encoder[row : row + 1])[0]
            cache.reused_last = True
    return torch.stack(hidden_rows), torch.stack(encoder_rows)


def _fit(residual: Any, length: int) -> Any:
    """A row's text residual, cut or zero-padded to this call's text length. Calls pad text to their longest row
    (Qwen-Image); a row's own tokens come first, and what lies past them is masked in attention and dropped
    after the last block, so the image is the same."""
    import torch

    if residual.shape[1] == length:
        return residual
    if residual.shape[1] > length:
        return residual[:, :length]
    return torch.nn.functional.pad(residual, (0, 0, 0, length - residual.shape[1]))
