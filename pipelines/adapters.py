"""Adapters on a worker's replica: which LoRAs and embeddings are loaded, and how a call applies them.

- A whole pipeline call (request batching) and prompt encoding apply LoRAs diffusers' own way, as a direct call
  does: `set_adapters(names, weights)`, or `disable_lora()` for none.
- A step-engine UNet call whose rows use different LoRAs (one each, or none) goes through PEFT's mixed-batch
  path: every LoRA layer gets the rows' `adapter_names` (PEFT's own forward argument, injected by a pre-hook),
  and each adapter's `lora_B` output is scaled per row by that row's weight. Rows without a LoRA are `__base__`.
  For that, the UNet applies every LoRA at weight 1.0; a call in which no row uses a LoRA runs them off.

Loaded adapters stay loaded: switching costs no reload. Embeddings change the tokenizer only by adding their
tokens, so prompts without those tokens are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LORA, EMBEDDING = "lora", "embedding"
BASE_ROW = "__base__"  # PEFT's name for a row that uses no adapter
DENOISERS = ("unet", "transformer")  # the component that denoises, as diffusers names it
OFF, ROWS = "off", "rows"  # what a component applies: no LoRA, or each row its own


class AdapterLoadError(ValueError):
    """A stored adapter does not load into the model it names as its base (shapes, targets): the request that
    asked for it gets INVALID_ARGUMENT naming it, and the operator a warning; the server goes on."""

    client_message = True


Catalog = Callable[[], tuple[int, Iterable["Adapter"]]]
"""What the store serves for a model now: (a version that changes with it, its adapters)."""


@dataclass(frozen=True)
class Adapter:
    """An adapter a request uses: LoRA weights at a weight, or an embedding (used through its token)."""

    name: str
    kind: str
    path: str
    weight: float = 1.0
    token: str | None = None


class ReplicaAdapters:
    """The adapters loaded into one replica of a model, and what each component applies now. Used only from its
    worker's thread. Every change goes through `_set`, which touches a component only when what it should apply
    differs from what it does: steady traffic costs no module walks."""

    def __init__(self, pipeline: Any, catalog: Catalog | None = None) -> None:
        self.pipeline = pipeline
        self.catalog = catalog  # what the store serves now: adapters gone from it (or replaced) are unloaded
        self.denoiser = next((name for name in DENOISERS if getattr(pipeline, name, None) is not None), "unet")
        self._loaded: dict[str, Adapter] = {}  # by name, with the stored file it came from (a version's)
        self._seen_version: int | None = None
        self._holds: dict[str, set[str]] = {}  # component (unet, text_encoder...) -> the LoRAs it holds
        self._state: dict[str, Any] = {}  # component -> what it applies now: OFF, ROWS, or ((name, weight), ...)
        self._rows: tuple[list[str], dict[str, Any]] | None = None  # the mixed call in progress
        self._row_adapters: list[Adapter | None] = []  # its rows' LoRAs, for `narrowed`
        self._hooked: set[int] = set()

    @property
    def loras(self) -> set[str]:
        """The LoRAs loaded into this replica."""
        return {name for name, adapter in self._loaded.items() if adapter.kind == LORA}

    def ensure(self, adapters: Iterable[Adapter], *, skip_broken: bool = False) -> None:
        """Load whatever of these is not loaded yet (an adapter added to the store while serving), and reload one
        whose stored file changed (re-imported); first unload what the store no longer serves. Module walks
        happen once per call, however many adapters load. One that does not load raises AdapterLoadError, or
        with `skip_broken` (start-up) is logged and left out."""
        from model_store.adapters import load_embedding

        self._reconcile()
        loaded = False
        for adapter in adapters:
            held = self._loaded.get(adapter.name)
            if held is not None and held.path == adapter.path:
                continue
            if held is not None:
                self._unload(adapter.name)
                loaded = loaded or held.kind == LORA
            try:
                if adapter.kind == LORA:
                    with warnings.catch_warnings():
                        # PEFT warns on every adapter after the first (several is the point), and when diffusers
                        # deletes one that failed to load (the error says so).
                        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
                        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                        self.pipeline.load_lora_weights(adapter.path, adapter_name=adapter.name)
                    loaded = True
                else:
                    load_embedding(self.pipeline, Path(adapter.path), adapter.token or "")
            except Exception as exc:
                reason = " ".join(line.strip() for line in str(exc).splitlines()[:2])[:300]
                log.warning(
                    "adapter %s cannot be loaded into %s: %s", adapter.name, type(self.pipeline).__name__, reason
                )
                if not skip_broken:  # the library's words stay in the log; the client hears which adapter
                    raise AdapterLoadError(f"adapter {adapter.name} cannot be loaded into this model") from exc
                continue  # at start-up: serve the others, refuse requests that name it
            self._loaded[adapter.name] = adapter
        if loaded:
            self._loras_changed()

    def _reconcile(self) -> None:
        """Unload the adapters the store no longer serves, or serves from another file (once per catalog change)."""
        if self.catalog is None:
            return
        version, current = self.catalog()
        if version == self._seen_version:
            return
        self._seen_version = version
        wanted = {adapter.name: adapter.path for adapter in current}
        stale = [name for name, held in self._loaded.items() if wanted.get(name) != held.path]
        loras = [name for name in stale if self._loaded[name].kind == LORA]
        for name in stale:
            self._unload(name)
        if loras:
            self._loras_changed()

    def _unload(self, name: str) -> None:
        """Free an adapter's weights: a LoRA's layers (the caller then calls `_loras_changed` once), or an
        embedding's token in each text encoder."""
        adapter = self._loaded.pop(name)
        if adapter.kind == LORA:
            self.pipeline.delete_adapters([name])
            return
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        for tokenizer, encoder in pairs:
            if getattr(self.pipeline, encoder, None) is not None:
                self.pipeline.unload_textual_inversion(
                    tokens=[adapter.token],
                    tokenizer=getattr(self.pipeline, tokenizer),
                    text_encoder=getattr(self.pipeline, encoder),
                )

    def _loras_changed(self) -> None:
        self._holds = {part: set(names) for part, names in self.pipeline.get_list_adapters().items()}
        self._state.clear()  # loading made the new adapter the active one everywhere
        self._hook_new_layers()

    def apply(self, loras: Sequence[Adapter]) -> None:
        """Set the LoRAs of a whole pipeline call, as a direct call's `set_adapters` (or `disable_lora`) does."""
        for component in self._holds:
            self._set(component, loras)

    def apply_to_text_encoders(self, loras: Sequence[Adapter]) -> None:
        """Set the LoRAs of prompt encoding (the text encoders' share of `set_adapters`)."""
        for component in self._holds:
            if component != self.denoiser:
                self._set(component, loras)

    def apply_to_unet(self, loras: Sequence[Adapter]) -> None:
        """Set several LoRAs for a whole UNet call (a step set whose items share the same several adapters)."""
        if self.denoiser in self._holds:
            self._set(self.denoiser, loras)

    @contextlib.contextmanager
    def per_row(self, rows: Sequence[Adapter | None]) -> Iterator[None]:
        """A UNet call in which row i uses `rows[i]` (one LoRA at its weight, or none)."""
        if self.denoiser not in self._holds or not any(rows):
            self.apply_to_unet(())  # no row uses a LoRA: the plain forward, adapters off
            yield
            return
        self._set(self.denoiser, ROWS)
        self._row_adapters = list(rows)
        self._rows = _row_table(rows)
        try:
            yield
        finally:
            self._rows = None
            self._row_adapters = []

    @contextlib.contextmanager
    def narrowed(self, rows: Sequence[int]) -> Iterator[None]:
        """Within a per-row call, a sub-batch of its rows (in this order): each keeps its own LoRA."""
        if self._rows is None:
            yield
            return
        whole = self._rows
        self._rows = _row_table([self._row_adapters[row] for row in rows])
        try:
            yield
        finally:
            self._rows = whole

    def _set(self, component: str, loras: Sequence[Adapter] | str) -> None:
        """Make `component` apply these LoRAs (those it holds), or ROWS: every LoRA on at weight 1.0, each row
        then taking its own through the hooks."""
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        held = self._holds[component]
        if loras == ROWS:
            pairs = tuple((name, 1.0) for name in sorted(held))
        else:
            pairs = tuple((a.name, a.weight) for a in loras if a.name in held)  # type: ignore[union-attr]
        wanted = ROWS if loras == ROWS else pairs or OFF
        if self._state.get(component) == wanted:
            return
        model = getattr(self.pipeline, component)
        names, weights = [name for name, _ in pairs], [weight for _, weight in pairs]
        if component == self.denoiser:
            if pairs:
                model.enable_lora()
                model.set_adapters(names, weights)
            else:
                model.disable_lora()
        elif pairs:
            enable_lora_for_text_encoder(model)
            set_adapters_for_text_encoder(names, model, weights)
        else:
            disable_lora_for_text_encoder(model)
        self._state[component] = wanted

    def _hook_new_layers(self) -> None:
        """Give every LoRA layer (new ones appear as adapters load) the hooks of the mixed-batch path."""
        from peft.tuners.lora import LoraLayer

        for found in getattr(self.pipeline, self.denoiser).modules():
            if not isinstance(found, LoraLayer):
                continue
            module: Any = found  # a torch module that is also PEFT's LoraLayer
            if id(module) not in self._hooked:
                module.register_forward_pre_hook(self._inject_names, with_kwargs=True)
                self._hooked.add(id(module))
            for name, lora_b in module.lora_B.items():
                if id(lora_b) not in self._hooked:
                    lora_b.register_forward_hook(functools.partial(self._scale_rows, name))
                    self._hooked.add(id(lora_b))

    def _inject_names(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self._rows is not None:
            kwargs["adapter_names"] = self._rows[0]
        return args, kwargs

    def _scale_rows(self, name: str, module: Any, args: Any, output: Any) -> Any:
        """PEFT runs `lora_B` on the rows using this adapter, in row order: scale each by its row's weight."""
        if self._rows is None:
            return output
        weights = self._rows[1].get(name)
        if weights is None:
            return output
        shape = (-1,) + (1,) * (output.dim() - 1)
        return output * weights.to(device=output.device, dtype=output.dtype).view(shape)


def _row_table(rows: Sequence[Adapter | None]) -> tuple[list[str], dict[str, Any]]:
    """What the hooks read for a per-row call: each row's adapter name, and each adapter's weights in row order."""
    import torch

    row_names = [adapter.name if adapter is not None else BASE_ROW for adapter in rows]
    weights: dict[str, list[float]] = {}
    for adapter in rows:
        if adapter is not None:
            weights.setdefault(adapter.name, []).append(adapter.weight)
    # Built in float64 and cast by the hook, so a weight such as 0.3 rounds once, as a scaling factor does.
    return row_names, {name: torch.tensor(values, dtype=torch.float64) for name, values in weights.items()}
