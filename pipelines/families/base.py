"""The one interface between the step engine and a pipeline family, and the records they pass each other.

The engine's loop (`pipelines.step_engine`) knows items, rows, sets and ticks; a family knows its pipeline: how
prompts are encoded, how an item starts (latents, schedule, per-item state), which rows it puts into the shared
denoiser call and how that call is made, how an item's rows become its next latents (the guidance combine and
the scheduler step), and how finished latents become images. Each family does these exactly as its pipelines'
`__call__` does, so every image equals the direct call.

Adding a family is one module that implements `StepFamily`, plus its line in `pipelines.families.FAMILIES`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..adapters import Adapter


@dataclass(frozen=True)
class StepInputs:
    """One image to denoise: every argument of the typed task's call, all of them per item. Families read the
    ones their pipelines take; validation has refused the others."""

    task: str
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    scheduler: str | None = None  # a compatible scheduler class name; None: the model's own
    eta: float | None = None
    strength: float | None = None  # img2img and inpaint, already resolved to the pipeline's default
    image: Any = None  # PIL RGB at (width, height)
    mask_image: Any = None  # PIL L at (width, height)
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    guidance_rescale: float = 0.0
    loras: tuple[Adapter, ...] = ()  # LoRAs at their weights
    embeddings: tuple[Adapter, ...] = ()  # embeddings whose tokens the prompts use
    prompt_3: str | None = None  # SD3's T5 prompt
    negative_prompt_3: str | None = None
    true_cfg_scale: float | None = None  # FLUX and Qwen-Image: a second, unconditional denoiser pass
    max_sequence_length: int | None = None  # the T5 prompt length; None: the pipeline's default
    references: tuple[Any, ...] = ()  # edit: the reference images (PIL RGB, their own sizes), in order
    size_given: bool = True  # False: the client left the size to the pipeline (edit: not the reference's)
    cache_threshold: float | None = None  # First Block Cache at this threshold (`pipelines.feature_cache`)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance as the UNet pipelines and SD3 decide it: guidance above 1."""
        return self.guidance_scale > 1


@dataclass
class Conditioning:
    """One item's conditioning rows, in the order its family puts them into the denoiser call."""

    embeds: Any  # encoder hidden states, (rows, tokens, dim)
    added: dict[str, Any] = field(default_factory=dict)  # other per-row inputs (pooled text, time ids), (rows, ...)


@dataclass
class Start:
    """Where an item's denoising starts: its latents, its own schedule, and whatever else its family keeps."""

    latents: Any
    timesteps: Any  # the item's own schedule (after strength), on the device
    state: dict[str, Any] = field(default_factory=dict)  # per item, read only by its family (inpaint mask, ids)


@dataclass
class Track:
    """One item in the denoising batch: its own scheduler, generator, latents and conditioning rows."""

    item: Any  # batching.WorkItem
    spec: StepInputs
    family: StepFamily
    pipe: Any  # the task's pipeline (derived for img2img and inpaint)
    scheduler: Any
    generator: Any
    conditioning: Conditioning
    latents: Any
    timesteps: Any
    state: dict[str, Any] = field(default_factory=dict)
    step: int = 0  # index of the next timestep
    held: int = 0  # ticks of its set it has waited, finished, for company in the decode
    joined: float = 0.0
    last_tick: float = 0.0

    @property
    def rows(self) -> int:
        return self.family.rows(self.spec)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    @property
    def timestep(self) -> Any:
        return self.timesteps[self.step]


class StepFamily(Protocol):
    """What differs between pipeline families, behind one interface the step engine calls."""

    classes: Mapping[str, str]  # the pipeline classes it reproduces -> the task each performs

    def capable(self, configs: Any, task: str) -> bool:
        """Whether the stored components (`configs`, a `families.Configs`) are ones this family reproduces."""

    def rows(self, spec: StepInputs) -> int:
        """Rows the item puts into each denoiser call (2 with classifier-free or true CFG, else 1)."""

    def split(self, spec: StepInputs) -> Hashable:
        """Beyond the model and latent shape, what keeps items out of one denoiser call (the text length where
        joint attention has no mask), or None."""

    def encode_groups(self, specs: Sequence[StepInputs]) -> Mapping[Hashable, list[int]]:
        """Which items one text-encoder call can encode together (indices into `specs`)."""

    def encode(self, base: Any, specs: Sequence[StepInputs], device: Any) -> list[Conditioning]:
        """One encode call for a group from `encode_groups`: each item's conditioning rows."""

    def start(
        self, pipe: Any, spec: StepInputs, scheduler: Any, generator: Any, device: Any, conditioning: Conditioning
    ) -> Start:
        """The item's schedule, starting latents and state, as the task's pipeline makes them with `scheduler`."""

    def row_inputs(self, track: Track) -> dict[str, Any]:
        """The item's rows of each batched denoiser input at its current step: a tensor to concatenate along
        dim 0, or a list of rows to join (`join_rows`)."""

    def denoise(self, pipe: Any, inputs: Mapping[str, Any], first: Track) -> Any:
        """ONE denoiser call over the concatenated rows (`first` gives what the rows share: ids, shapes)."""

    def advance(self, track: Track, prediction: Any) -> Any:
        """The item's next latents from its rows of the prediction: guidance combine, then its scheduler's step."""

    def decode(self, base: Any, tracks: Sequence[Track], device: Any) -> tuple[list[Any], list[bool]]:
        """Images (PIL) and NSFW flags for finished items (of one set), decoded together."""


@contextlib.contextmanager
def scheduler_on(pipe: Any, scheduler: Any) -> Iterator[None]:
    """Run pipeline methods that read `self.scheduler` with an item's own scheduler: safe, because a worker owns
    its replica and is the only thread that touches it."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = own


def step_kwargs(scheduler: Any, eta: float | None, generator: Any) -> dict[str, Any]:
    """`prepare_extra_step_kwargs`: eta (the pipelines' default is 0.0) and the generator, where `step` takes them."""
    params = _step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0 if eta is None else eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


_STEP_PARAMETERS: dict[type, frozenset[str]] = {}


def _step_parameters(cls: type) -> frozenset[str]:
    if cls not in _STEP_PARAMETERS:
        _STEP_PARAMETERS[cls] = frozenset(inspect.signature(cls.step).parameters)  # type: ignore[attr-defined]
    return _STEP_PARAMETERS[cls]


def scheduler_step(track: Track, prediction: Any) -> Any:
    """The item's own scheduler step with its own generator (and eta where the scheduler takes it)."""
    kwargs = step_kwargs(track.scheduler, track.spec.eta, track.generator)
    return track.scheduler.step(prediction, track.timestep, track.latents, **kwargs, return_dict=False)[0]


def guidance_rows(
    cfg: bool, cond: Any, uncond: Any, pooled: Any = None, uncond_pooled: Any = None, pooled_name: str = ""
) -> list[Conditioning]:
    """Each item's rows from one batched `encode_prompt`: [unconditional, conditional] with classifier-free
    guidance, else the conditional one; the pooled text (SDXL, SD3) as the added input `pooled_name`."""
    import torch

    def rows(conditional: Any, unconditional: Any, i: int) -> Any:
        one = conditional[i : i + 1]
        return torch.cat([unconditional[i : i + 1], one]) if cfg else one

    return [
        Conditioning(rows(cond, uncond, i), {pooled_name: rows(pooled, uncond_pooled, i)} if pooled is not None else {})
        for i in range(cond.shape[0])
    ]


def resolution_shift(config: Any, image_seq_len: int, max_shift: float) -> float:
    """The flow-matching pipelines' `calculate_shift` (`mu`) for an image of `image_seq_len` tokens, from the
    scheduler's config with the pipeline's own fallbacks (`max_shift`: FLUX 1.15, SD3 1.16)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(
        calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift),
        )
    )


def text_rows(embeds: Sequence[Any], specs: Sequence[StepInputs], second_row: Any) -> list[Conditioning]:
    """Each item's rows as a list, from texts encoded as [every item's prompt, then the negative prompt of each
    item with `second_row(spec)`]: its prompt's, then its negative's (Qwen-Image, Z-Image)."""
    result, negative = [], len(specs)
    for index, spec in enumerate(specs):
        rows = [embeds[index]]
        if second_row(spec):
            rows.append(embeds[negative])
            negative += 1
        result.append(Conditioning(rows))
    return result


def join_rows(parts: Sequence[Any]) -> Any:
    """One denoiser input from every item's rows: tensors concatenate along dim 0; lists (rows whose lengths
    differ, such as Qwen-Image's and Z-Image's text) are joined, for the family's `denoise` to pad or pass on."""
    import torch

    if isinstance(parts[0], list):
        return [row for part in parts for row in part]
    return torch.cat(list(parts))


def one_per_item(specs: Sequence[Any], key: Any) -> dict[Hashable, list[int]]:
    """Group the indices of items (or texts) by `key(spec)`."""
    groups: dict[Hashable, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(key(spec), []).append(index)
    return groups
