"""Facts read from a stored pipeline's config files without loading any weights: default output size, scheduler
choices, how many ControlNet inputs it takes, and whether it was made for bfloat16."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DENOISERS = ("unet", "transformer", "prior")
# A latent size for denoisers whose config has none (Flux): diffusers' pipelines default to 128 latents (1024 px).
FALLBACK_LATENT_SIZE = {"unet": 64, "transformer": 128, "prior": 64}
# Pipelines whose `__call__` body fixes the size a call without one gets (`height = height or 1024`), whatever
# their components' configs say; those that say it in the signature (AuraFlow, Sana) are read from it.
FIXED_DEFAULT_SIZE = {"ZImagePipeline": 1024}
_CONTROLNET_FOLDER = re.compile(r"controlnet(_\d+)?")


@dataclass(frozen=True)
class PipelineDefaults:
    height: int
    width: int
    scheduler: str
    compatible_schedulers: tuple[str, ...]
    control_inputs: int = 0  # ControlNet conditioning images a request must send
    prefers_bfloat16: bool = False  # a component's config says it was made for bfloat16


def read_pipeline_defaults(folder: Path, scheduler: str | None = None) -> PipelineDefaults:
    """Default output size (the denoiser's sample size times the VAE's scale factor), the scheduler (`scheduler`
    when the load options replace the stored one) and its compatible choices, and the ControlNet inputs."""

    def config(part: str, name: str = "config.json") -> dict[str, Any]:
        try:
            return dict(json.loads((folder / part / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    index = config(".", "model_index.json")
    denoiser_name = next((name for name in DENOISERS if name in index), "unet")
    denoiser, vae = config(denoiser_name), config("vae")
    sample = denoiser.get("sample_size") or FALLBACK_LATENT_SIZE[denoiser_name]
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)[:2]
    height, width = int(height) * _vae_scale(vae), int(width) * _vae_scale(vae)
    fixed = FIXED_DEFAULT_SIZE.get(str(index.get("_class_name")))
    if fixed:
        height = width = fixed
    scheduler_config = config("scheduler", "scheduler_config.json")
    scheduler = scheduler or str(scheduler_config.get("_class_name", ""))
    return PipelineDefaults(
        height,
        width,
        scheduler,
        compatible_schedulers(scheduler, scheduler_config or None),
        control_inputs=_control_inputs(folder, index),
        prefers_bfloat16=any(
            config(part).get("torch_dtype", config(part).get("dtype")) == "bfloat16"
            for part, entry in index.items()
            if isinstance(entry, list)
        ),
    )


def _vae_scale(vae: dict[str, Any]) -> int:
    """What the VAE divides a side by: once per block after the first (f8 for Stable Diffusion), or once per
    entry of `temperal_downsample` (Qwen-Image's and Wan's, as their pipelines compute it); pixel-space models
    have no VAE."""
    if vae.get("temperal_downsample"):
        return int(2 ** len(vae["temperal_downsample"]))
    return int(2 ** (len(vae["block_out_channels"]) - 1)) if vae.get("block_out_channels") else 1


def _control_inputs(folder: Path, index: dict[str, Any]) -> int:
    entry = index.get("controlnet")
    if not isinstance(entry, list) or entry[-1] is None:
        return 0
    if "Multi" not in str(entry[-1]):
        return 1
    # MultiControlNetModel saves its nets as controlnet, controlnet_1, controlnet_2, ...
    return sum(1 for p in folder.iterdir() if _CONTROLNET_FOLDER.fullmatch(p.name) and (p / "config.json").is_file())


def compatible_schedulers(scheduler: str, config: Any = None) -> tuple[str, ...]:
    """The scheduler classes a request may name instead of `scheduler`: those diffusers lists as compatible that
    can be built here (some need extras such as scipy or torchsde), from `config` when given."""
    import diffusers

    cls = getattr(diffusers, scheduler, None)
    if cls is None:
        return ()
    names = {scheduler} | {str(name) for name in getattr(cls, "_compatibles", [])}
    return tuple(sorted(name for name in names if _buildable(name, config)))


def _buildable(name: str, config: Any) -> bool:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or "Dummy" in name:
        return False
    try:  # a class whose extra package is missing is a placeholder that raises ImportError when built
        cls.from_config(config) if config is not None else cls()
    except ImportError:
        return False
    except Exception:  # a config it cannot take: requests naming it would fail the same way
        return config is None
    return True
