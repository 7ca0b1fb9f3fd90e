"""Continuous batching at denoising-step boundaries: requests join and leave a running batch.

One worker's engine holds one active set per (model, latent shape, family split): only those decide which items
may share a denoiser call. The executor's worker loop admits items (`join`, between ticks) and calls `tick` while
any item is active. One tick is the whole algorithm:

    prepare the items that joined since the last tick (their prompts encoded together, their latents started)
    pick the active set that has waited longest (so no set starves)
    drop its cancelled and expired items
    run ONE denoiser call over the rows of all its items: each row with its own timestep and conditioning
    per item: its own guidance combine, then its own scheduler's step with its own generator
    items whose last step this was leave: decode them together and hand back their images (a finished item
        waits up to DECODE_HOLD_TICKS ticks for batch-mates about to finish: one VAE call for several is cheaper)

Everything that differs between pipeline families (how many rows an item has, what goes into the denoiser call,
the guidance combine, the scheduler step, the decode) is the family's (`pipelines.families.StepFamily`); the
loop calls only that interface. Each item owns its scheduler, so items with different steps, guidance,
schedulers, eta, strength and seeds share every call, and each image equals its solo `pipe(...)` call. Nothing
syncs the host in a tick but the schedulers' own bookkeeping and the decode of finished items.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batching import BatchKey, ItemCancelledError, ItemOutput, OutOfMemoryError, StepEvent, Tick, WorkItem, WorkKind
from batching.errors import DeadlineExceededError
from batching.executor import is_out_of_memory

from .adapters import ReplicaAdapters
from .device import Device
from .families import Conditioning, StepFamily, StepInputs, Track, family_of, join_rows
from .feature_cache import CACHEABLE_PIPELINES, RowCache, first_block_cache

log = logging.getLogger(__name__)
STEP_INPUT = "step"  # WorkItem.inputs[STEP_INPUT] holds the item's StepInputs
# Finished items wait up to this many ticks of their set for others about to finish, so the VAE decodes them
# together: decoding costs per call (tiny model on the CPU: 10 ms for 1 image, 25 ms for 4).
DECODE_HOLD_TICKS = 2
LORAS, PER_ROW = "loras", "per-row"  # BatchKey.group[LORAS]: the LoRA set items share calls by (several), or PER_ROW
ROW_CACHES = "row_caches"  # Track.state[ROW_CACHES]: each row's First Block Cache state, when the item asks for it
STEPS_CACHED = "steps_cached"  # Track.state[STEPS_CACHED]: the item's steps in which a row reused its cache
SPLIT = "split"  # BatchKey.group[SPLIT]: what the family says keeps items out of one call (StepFamily.split)


def step_key(tag: str, signature: str, pipeline_class: type, spec: StepInputs) -> BatchKey:
    """The batch key of a step item: the model, the latent shape, the family's split and (for several LoRAs at
    once) the adapter set group items; everything else is per item."""
    family = family_of(pipeline_class)
    group: dict[str, Hashable] = {"size": (spec.height, spec.width)}
    split = family.split(spec) if family is not None else None
    if split is not None:
        group[SPLIT] = split
    if len(spec.loras) > 1:
        group[LORAS] = spec.loras
    return BatchKey.build(tag, signature, {}, kind=WorkKind.STEP, group=group)


class NumericalError(ValueError):
    """An item's latents stopped being finite: an extreme request value (a huge guidance scale) or a float16
    overflow. A ValueError, so the client hears INVALID_ARGUMENT; the worker logs a warning for the operator."""

    client_message = True  # ours, written for the client


@dataclass
class _Model:
    """A served model as the engine uses it."""

    base: Any  # the loaded pipeline
    family: StepFamily
    tasks: Mapping[str, Any]  # signature name -> the pipeline that performs its task
    adapters: ReplicaAdapters
    schedulers: dict[str, list[Any]] = field(default_factory=dict)  # free scheduler instances by class name


class StepEngine:
    """One worker's step engine over its loaded models (`model_store` runners by tag)."""

    def __init__(
        self,
        models: Mapping[str, Any],
        device: Device,
        adapters: Mapping[str, ReplicaAdapters],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.clock = clock
        self._models: dict[str, _Model] = {}
        for tag, runner in models.items():
            family = family_of(type(runner.pipeline))
            if family is not None:
                tasks = {name: sig.pipeline for name, sig in runner.signatures.items()}
                self._models[tag] = _Model(runner.pipeline, family, tasks, adapters[tag])
        self._sets: dict[Hashable, list[Track]] = {}
        self._pending: list[WorkItem] = []
        self._suspended: dict[int, Track] = {}  # evicted after an out-of-memory, by id(item)
        self._leaving: dict[Hashable, list[Track]] = {}  # finished, waiting to be decoded together, by set

    # --- what the executor asks ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._pending) or any(self._sets.values()) or any(self._leaving.values())

    @staticmethod
    def group_of(key: BatchKey) -> Hashable:
        """Items of a model and latent shape share denoiser calls, whatever their task or parameters, and whatever
        single LoRA each uses (per row); items using several LoRAs share calls only with the same several; and
        what the family says must split a call (`StepFamily.split`) splits it."""
        group = dict(key.group)
        return (key.model, group.get("size"), group.get(LORAS, PER_ROW), group.get(SPLIT))

    def load(self, key: BatchKey) -> tuple[Hashable, int, int]:
        group = self.group_of(key)
        tracks = self._sets.get(group, [])
        pending = [item for item in self._pending if self.group_of(item.key) == group]
        rows = sum(t.rows for t in tracks) + sum(self._models[i.key.model].family.rows(_spec(i)) for i in pending)
        return group, len(tracks) + len(pending), rows

    def join(self, items: Sequence[WorkItem]) -> None:
        """Items join at the next tick (their preparation is batched there)."""
        self._pending.extend(items)

    def abandon(self) -> list[WorkItem]:
        items = [t.item for tracks in self._sets.values() for t in tracks] + self._pending
        items += [t.item for t in self._suspended.values()]
        items += [t.item for tracks in self._leaving.values() for t in tracks]
        self._sets.clear()
        self._leaving.clear()
        self._pending.clear()
        self._suspended.clear()
        return items

    # --- the loop --------------------------------------------------------------------------------------------

    def tick(self) -> Tick:
        """One step of one set (the module docstring's loop); the Tick also says what the engine holds after it."""
        tick = self._step()
        tick.in_flight = self.in_flight
        return tick

    def _step(self) -> Tick:
        now = self.clock()
        failed = self._admit(now)
        group = min(self._sets, key=lambda g: min(t.last_tick for t in self._sets[g]), default=None)
        if group is None:
            return Tick(None, 0, 0.0, failed=failed)
        tracks, failed = self._live(self._sets[group], now, failed)
        self._sets[group] = tracks
        if not tracks:
            tick = Tick(group, 0, 0.0, failed=failed)
            self._finish(group, tick)  # whoever finished earlier and waits for the decode leaves now
            return tick
        rows = sum(t.rows for t in tracks)
        started = self.clock()
        first_steps = [started - t.joined for t in tracks if t.step == 0]
        try:
            with self.device.running(synchronize=False):
                noise = self._denoise(tracks)
        except Exception as exc:
            if is_out_of_memory(exc):
                return self._out_of_memory(group, tracks, rows, failed)
            return self._isolate(group, tracks, exc, failed, started)
        keys = frozenset(track.item.key for track in tracks)
        tick = Tick(group, rows, 0.0, failed=failed, active=len(tracks), join_waits=first_steps, keys=keys)
        with self.device.running(synchronize=False):
            self._advance(tracks, noise, tick)
        tick.seconds = self.clock() - started
        for track in tracks:  # traced requests keep their ticks, for their spans
            if track.item.trace.ticks is not None:
                track.item.trace.ticks.append((started, started + tick.seconds, rows, len(tracks)))
        self._finish(group, tick)
        return tick

    @property
    def in_flight(self) -> int:
        """Items the engine holds: denoising, waiting to start, or evicted and waiting to resume."""
        sets = [*self._sets.values(), *self._leaving.values()]
        return sum(len(tracks) for tracks in sets) + len(self._pending) + len(self._suspended)

    def _denoise(self, tracks: Sequence[Track]) -> Any:
        """ONE denoiser call over every row of the set, each item's rows as its family builds them."""
        family = tracks[0].family
        rows = [family.row_inputs(track) for track in tracks]
        inputs = {name: join_rows([item_rows[name] for item_rows in rows]) for name in rows[0]}
        adapters = self._models[tracks[0].item.key.model].adapters
        several = tracks[0].spec.loras if len(tracks[0].spec.loras) > 1 else ()
        if several:  # everyone in this set uses the same several LoRAs: set them on the denoiser
            adapters.apply_to_unet(several)
            applied: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:  # one LoRA (or none) per item: each row its own, in one call
            per_row = [t.spec.loras[0] if t.spec.loras else None for t in tracks for _ in range(t.rows)]
            applied = adapters.per_row(per_row)
        caches = [cache for t in tracks for cache in t.state.get(ROW_CACHES, [None] * t.rows)]
        with applied, first_block_cache(tracks[0].pipe, caches, adapters.narrowed):
            prediction = family.denoise(tracks[0].pipe, inputs, tracks[0])
        for track in tracks:  # a step reused the cache when any of the item's rows did
            if any(cache.reused_last for cache in track.state.get(ROW_CACHES, ())):
                track.state[STEPS_CACHED] = track.state.get(STEPS_CACHED, 0) + 1
        return prediction

    def _advance(self, tracks: Sequence[Track], noise: Any, tick: Tick) -> None:
        """Each item's next latents from its own rows, as its family's pipeline loop makes them."""
        offset = 0
        for track in tracks:
            trace = track.item.trace  # for the request's log line: the most items it shared a step with
            trace.batch_size = max(trace.batch_size, len(tracks))
            prediction = noise[offset : offset + track.rows]
            offset += track.rows
            try:
                track.latents = track.family.advance(track, prediction)
            except Exception as exc:  # this item's scheduler or inputs: it fails alone
                tick.failed.append((track.item, exc))
                track.step = len(track.timesteps)
                continue
            track.step += 1
            track.last_tick = self.clock()
            if track.item.on_progress is not None:
                event = StepEvent(track.step, len(track.timesteps), self.clock() - track.joined, track.latents[0])
                tick.progress.append((track.item, event))

    def _finish(self, group: Hashable, tick: Tick) -> None:
        """Items whose last step this was leave: decoded together (with those that finished just before and
        waited), their images handed back."""
        import torch

        tracks = self._sets.pop(group, [])
        failed = {id(item) for item, _ in tick.failed}
        running = [t for t in tracks if not t.done]
        if running:
            self._sets[group] = running
        for track in tracks:
            if track.done:
                self._release(track)
        leaving = self._leaving.pop(group, []) + [t for t in tracks if t.done and id(t.item) not in failed]
        if self._wait_for_company(leaving, running, len(tracks)):
            for track in leaving:
                track.held += 1
            self._leaving[group] = leaving
            return
        finite = []
        for track in leaving:  # the one host sync per finished batch: the decode below needs it anyway
            if bool(torch.isfinite(track.latents).all()):
                finite.append(track)
            else:
                log.warning(
                    "%s: an item's latents became non-finite (NaN or inf); it fails alone", track.item.key.model
                )
                error = NumericalError("the model's latents became non-finite (NaN or inf) for this request")
                tick.failed.append((track.item, error))
        if not finite:
            return
        first = finite[0]
        with self.device.running():
            images, nsfw = first.family.decode(self._models[first.item.key.model].base, finite, self.device.name)
        tick.finished += [
            (t.item, ItemOutput(image, flag, *cache_steps(t))) for t, image, flag in zip(finite, images, nsfw)
        ]

    @staticmethod
    def _wait_for_company(leaving: Sequence[Track], running: Sequence[Track], set_size: int) -> bool:
        """Whether finished items should wait for the next tick: only while another item will finish before the
        longest-waiting one has waited DECODE_HOLD_TICKS, and never past a decode of the set's size."""
        if not leaving or len(leaving) >= set_size:
            return False
        reach = DECODE_HOLD_TICKS - max(t.held for t in leaving)
        return any(len(t.timesteps) - t.step <= reach for t in running)

    # --- joining ---------------------------------------------------------------------------------------------

    def _admit(self, now: float) -> list[tuple[WorkItem, BaseException]]:
        """Start every pending item: suspended ones resume; new ones are encoded together where their prompts
        allow (one text-encoder call per model and guidance mode) and get their own scheduler and latents."""
        pending, self._pending = self._pending, []
        failed: list[tuple[WorkItem, BaseException]] = []
        for key, evicted in list(self._suspended.items()):  # evicted, then cancelled or expired in the queue
            if evicted.item.future.done():
                del self._suspended[key]
                self._release(evicted)
        fresh: dict[str, list[WorkItem]] = {}
        for item in pending:
            resumed = self._suspended.pop(id(item), None)
            if resumed is not None:
                resumed.last_tick = now
                self._sets.setdefault(self.group_of(item.key), []).append(resumed)
            else:
                fresh.setdefault(item.key.model, []).append(item)
        for tag, items in fresh.items():
            model = self._models[tag]
            loadable = []
            for item in items:  # an adapter that does not load fails its own items, not its encode group
                try:
                    spec = _spec(item)
                    model.adapters.ensure((*spec.loras, *spec.embeddings))
                    loadable.append(item)
                except Exception as exc:
                    failed.append((item, exc))
            items = loadable
            specs = [_spec(item) for item in items]
            for indices in _encode_groups(model.family, specs):
                group_items = [items[i] for i in indices]
                try:
                    with self.device.running(synchronize=False):
                        loras = specs[indices[0]].loras  # the text encoders' LoRAs too, as a direct call sets them
                        model.adapters.ensure(
                            adapter for i in indices for adapter in (*specs[i].loras, *specs[i].embeddings)
                        )
                        model.adapters.apply_to_text_encoders(loras)
                        conditioning = model.family.encode(model.base, [specs[i] for i in indices], self.device.name)
                except Exception as exc:
                    failed += [(item, exc) for item in group_items]
                    continue
                for item, cond in zip(group_items, conditioning):
                    try:
                        with self.device.running(synchronize=False):
                            track = self._start(model, item, cond, now)
                    except Exception as exc:
                        failed.append((item, exc))
                        continue
                    self._sets.setdefault(self.group_of(item.key), []).append(track)
        return failed

    def _start(self, model: _Model, item: WorkItem, conditioning: Conditioning, now: float) -> Track:
        import torch

        spec = _spec(item)
        pipe = model.tasks[item.key.signature]
        scheduler = self._scheduler(model, spec.scheduler)
        # A CPU generator: a seed gives the same starting noise on every device type.
        generator = torch.Generator("cpu").manual_seed(item.seed % 2**64)
        start = model.family.start(pipe, spec, scheduler, generator, self.device.name, conditioning)
        if spec.cache_threshold is not None and type(pipe).__name__ in CACHEABLE_PIPELINES:
            rows = model.family.rows(spec)  # each row its own state, as each of its pipeline's cache contexts
            start.state[ROW_CACHES] = [RowCache(spec.cache_threshold) for _ in range(rows)]
        return Track(
            item,
            spec,
            model.family,
            pipe,
            scheduler,
            generator,
            conditioning,
            start.latents,
            start.timesteps,
            start.state,
            joined=item.trace.started or now,
            last_tick=now,
        )

    def _scheduler(self, model: _Model, name: str | None) -> Any:
        """A scheduler instance of its own for an item, reused once its last item has left (`set_timesteps`
        resets a scheduler, as a pipeline reuses its own between calls)."""
        key = name or ""
        free = model.schedulers.setdefault(key, [])
        if free:
            return free.pop()
        own = model.base.scheduler
        if not name:
            return type(own).from_config(own.config)
        import diffusers

        return getattr(diffusers, name).from_config(own.config)

    def _release(self, track: Track) -> None:
        model = self._models[track.item.key.model]
        model.schedulers.setdefault(track.spec.scheduler or "", []).append(track.scheduler)

    # --- faults ----------------------------------------------------------------------------------------------

    def _live(
        self, tracks: list[Track], now: float, failed: list[tuple[WorkItem, BaseException]]
    ) -> tuple[list[Track], list[tuple[WorkItem, BaseException]]]:
        """Cancelled items and those past their deadline leave before the tick; their batch-mates go on."""
        live = []
        for track in tracks:
            item = track.item
            if item.cancel_requested:
                failed.append((item, ItemCancelledError("cancelled while denoising")))
            elif item.deadline is not None and now >= item.deadline:
                failed.append((item, DeadlineExceededError("the deadline passed while denoising")))
            else:
                live.append(track)
                continue
            self._release(track)
        return live, failed

    def _isolate(
        self,
        group: Hashable,
        tracks: list[Track],
        error: Exception,
        failed: list[tuple[WorkItem, BaseException]],
        started: float,
    ) -> Tick:
        """The shared call failed: run each item's rows alone, so only an item that fails alone fails."""
        tick = Tick(group, 0, 0.0, failed=failed, active=len(tracks))
        if len(tracks) == 1:
            tick.failed.append((tracks[0].item, error))
            tracks[0].step = len(tracks[0].timesteps)
        else:
            for track in tracks:
                try:
                    with self.device.running(synchronize=False):
                        self._advance([track], self._denoise([track]), tick)
                except Exception as exc:
                    tick.failed.append((track.item, exc))
                    track.step = len(track.timesteps)
        tick.seconds = self.clock() - started
        self._finish(group, tick)
        return tick

    def _out_of_memory(
        self, group: Hashable, tracks: list[Track], rows: int, failed: list[tuple[WorkItem, BaseException]]
    ) -> Tick:
        """Out of memory: the newest half of the set goes back to the queue, keeping its latents and scheduler
        state (it resumes where it was); the executor lowers the set's row budget."""
        tick = Tick(group, rows, 0.0, failed=failed, out_of_memory=True)
        if len(tracks) == 1:
            tick.failed.append((tracks[0].item, OutOfMemoryError("out of device memory even for a single image")))
            tracks[0].step = len(tracks[0].timesteps)  # it leaves, failed; whoever waits for the decode leaves too
            self._finish(group, tick)
            return tick
        newest = sorted(tracks, key=lambda t: t.joined)[len(tracks) // 2 :]
        for track in newest:
            self._suspended[id(track.item)] = track
            tick.evicted.append(track.item)
        self._sets[group] = [t for t in tracks if id(t.item) not in self._suspended]
        return tick


def _encode_groups(family: StepFamily, specs: Sequence[StepInputs]) -> list[list[int]]:
    """Items whose prompts one text-encoder call can encode: the family's groups, split by LoRA set."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for key, indices in family.encode_groups(specs).items():
        for index in indices:
            groups.setdefault((key, specs[index].loras), []).append(index)
    return list(groups.values())


def _spec(item: WorkItem) -> StepInputs:
    spec: StepInputs = item.inputs[STEP_INPUT]
    return spec


def cache_steps(track: Track) -> tuple[int | None, int | None]:
    """(denoiser steps run in full, steps that reused the cache) of a cached item: a step reused the cache when
    any of its rows did (its rows decide apart, as its pipeline's cache contexts do); (None, None) uncached."""
    if not track.state.get(ROW_CACHES):
        return None, None
    reused = int(track.state.get(STEPS_CACHED, 0))
    return len(track.timesteps) - reused, reused
