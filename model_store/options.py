"""How a stored pipeline loads: the options of `Model.with_options`, which of them a model stores, and how a
stored option and the operator's combine.

Stored options come from the importer (`models import --option KEY=VALUE`) and are checked then; the operator's
options (serve flags, `with_options` in Python) win over them. Trust and code paths are never stored options:
`custom_pipeline`, `trust_remote_code`, `pipeline_class` and `allow_pickle` come from the operator only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import StoreError

DTYPES = ("float32", "float16", "bfloat16", "float64")
CPU_OFFLOAD = ("none", "model", "sequential")
# What `models import --option` may store; the rest are the operator's alone.
STORED_KEYS = (
    "torch_dtype",
    "variant",
    "scheduler",
    "attention_slicing",
    "vae_slicing",
    "vae_tiling",
    "cpu_offload",
    "cache",
)
_BOOLEAN_KEYS = ("attention_slicing", "vae_slicing", "vae_tiling")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a stored pipeline. Immutable: `Model.with_options` returns a new Model. None means "not set":
    then the stored option applies, else the default."""

    device: str | None = None
    torch_dtype: str | None = None  # one of DTYPES
    scheduler: str | type | None = None  # a diffusers scheduler class (or its name), built with from_config
    pipeline_class: str | type | None = None  # a class, a diffusers class name, or a dotted "module.Class"
    custom_pipeline: str | None = None  # a local .py file; needs trust_remote_code
    trust_remote_code: bool = False
    variant: str | None = None  # e.g. "fp16": load weights saved as *.fp16.safetensors
    attention_slicing: bool | None = None  # less memory, slower attention
    vae_slicing: bool | None = None  # decode a batch one image at a time
    vae_tiling: bool | None = None  # decode large images tile by tile
    cpu_offload: str | None = None  # "none", "model" (whole modules to the GPU in turn), "sequential" (layers)
    allow_pickle: bool = False  # load .bin/.ckpt weights too; safetensors only otherwise
    compile: bool = False  # torch.compile the denoiser (CUDA only)
    cache: str | None = None  # the requests' default feature cache: "first_block:THRESHOLD" or "none"

    def merged_with(self, stored: Mapping[str, Any]) -> LoadOptions:
        """These options, with the stored ones filling what is not set here."""
        fill = {key: value for key, value in check_stored(stored).items() if getattr(self, key) is None}
        return dataclasses.replace(self, **fill)

    def shown(self) -> dict[str, str]:
        """The options in effect that a client may see (GetModel), as text."""
        visible = (*STORED_KEYS, "compile")
        return {key: _text(getattr(self, key)) for key in visible if getattr(self, key) not in (None, False)}


def check(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate options given to `with_options`, by name and value; returns them normalised."""
    known = {f.name for f in dataclasses.fields(LoadOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StoreError(f"unknown load option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    checked = dict(options)
    if checked.get("torch_dtype") is not None and checked["torch_dtype"] not in DTYPES:
        raise StoreError(f"torch_dtype must be one of {', '.join(DTYPES)}, got {checked['torch_dtype']!r}")
    offload = checked.get("cpu_offload")
    if isinstance(offload, bool):  # the first format's flag meant model offload
        checked["cpu_offload"] = "model" if offload else "none"
    elif offload is not None and offload not in CPU_OFFLOAD:
        raise StoreError(f"cpu_offload must be one of {', '.join(CPU_OFFLOAD)}, got {offload!r}")
    scheduler = checked.get("scheduler")
    if isinstance(scheduler, str):
        _scheduler_class(scheduler)
    if checked.get("cache") is not None:
        cache_threshold(str(checked["cache"]))
    return checked


def cache_threshold(text: str) -> float | None:
    """The First Block Cache threshold a `cache` option names ("first_block:0.2"), or None for "none"."""
    import math

    method, _, threshold = text.partition(":")
    if method == "none" and not threshold:
        return None
    try:
        value = float(threshold) if method == "first_block" else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise StoreError(f"cache must be first_block:THRESHOLD (a number of at least 0) or none, got {text!r}")
    return value


def check_stored(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The storable options of a model.yaml (anything else there, trust included, is ignored), validated."""
    return check({key: value for key, value in stored.items() if key in STORED_KEYS and value is not None})


def parse_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `models import --option`, checked: an unknown key or a bad value fails with the reason."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise StoreError(f"--option {text!r}: expected KEY=VALUE")
    if key not in STORED_KEYS:
        raise StoreError(f"--option {key}: not a stored option; the stored options are {', '.join(STORED_KEYS)}")
    value: Any = raw
    if key in _BOOLEAN_KEYS:
        lowered = raw.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise StoreError(f"--option {key}: expected true or false, got {raw!r}")
        value = lowered in ("true", "1", "yes", "on")
    return key, check({key: value})[key]


def _scheduler_class(name: str) -> type:
    import diffusers

    found = getattr(diffusers, name, None)
    if not isinstance(found, type) or not issubclass(found, diffusers.SchedulerMixin):
        raise StoreError(f"scheduler {name!r} is not a diffusers scheduler class")
    return found


def scheduler_class(scheduler: str | type) -> type:
    """The scheduler class an option names."""
    return scheduler if isinstance(scheduler, type) else _scheduler_class(scheduler)


def _text(value: Any) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
