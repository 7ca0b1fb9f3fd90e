"""The step engine against the direct `pipe(...)` call: bit-identical in float64 for SD (4- and 9-channel
inpainting) and SDXL, with mixed steps, guidance, schedulers, eta, strength, negative prompts, tasks and joins in
the middle of a run; and its faults: a failing item, non-finite latents, out of memory (evict and resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from batching import BatchKey, Executor, WorkItem, WorkKind
from model_store import ModelStore
from model_store.demo import DEMO_SIGNATURES
from model_store.tiny_families import build_tiny_sd_inpainting, build_tiny_sdxl
from pipelines.adapters import ReplicaAdapters
from pipelines.device import Device
from pipelines.families import StepInputs
from pipelines.step_engine import STEP_INPUT, NumericalError, StepEngine
from pipelines.worker import PipelineWorker


def picture(seed: int = 7) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")


def half_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    return Image.fromarray(mask, "L")


@pytest.fixture(scope="module")
def home(tmp_path_factory, store):
    models = ModelStore(tmp_path_factory.mktemp("step"))
    models.import_model("sd", store.get("tiny-sd").path, signatures=DEMO_SIGNATURES)
    models.save_model("sdxl", build_tiny_sdxl(seed=0), signatures=DEMO_SIGNATURES)
    models.save_model("inpainting", build_tiny_sd_inpainting(seed=0), signatures={"__call__": {"batchable": True}})
    return models


def runners(home: ModelStore, dtype: str) -> dict:
    return {m.tag: m.with_options(torch_dtype=dtype).to_runner("cpu") for m in home.list_models()}


def engine_of(loaded: dict) -> StepEngine:
    return StepEngine(loaded, Device("cpu"), {tag: ReplicaAdapters(r.pipeline) for tag, r in loaded.items()})


def item(tag: str, signature: str, spec: StepInputs, seed: int) -> WorkItem:
    key = BatchKey.build(tag, signature, {}, kind=WorkKind.STEP, group={"size": (spec.height, spec.width)})
    return WorkItem(key, {STEP_INPUT: spec}, seed=seed)


def solo(runner, signature: str, spec: StepInputs, seed: int) -> Image.Image:
    """The direct diffusers call for this request alone, with a fresh scheduler of the named class."""
    import diffusers

    pipe = runner.signatures[signature].pipeline
    own = pipe.scheduler
    scheduler_class = getattr(diffusers, spec.scheduler) if spec.scheduler else type(own)
    pipe.scheduler = scheduler_class.from_config(own.config)
    kwargs = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    optional = ("eta", "prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size")
    kwargs.update({name: getattr(spec, name) for name in optional if getattr(spec, name) is not None})
    if spec.task != "img2img":
        kwargs.update(height=spec.height, width=spec.width)
    if spec.task != "text2img":
        kwargs.update(image=spec.image, strength=spec.strength)
    if spec.task == "inpaint":
        kwargs["mask_image"] = spec.mask_image
    try:
        with torch.inference_mode():
            return pipe(**kwargs).images[0]
    finally:
        pipe.scheduler = own


def levels_from_solo(runner, signature: str, spec: StepInputs, seed: int, image: Image.Image) -> int:
    """The largest per-pixel difference, in uint8 levels, between an image and its solo `pipe(...)` call."""
    expected = np.asarray(solo(runner, signature, spec, seed), dtype=np.int16)
    got = np.asarray(image, dtype=np.int16)
    assert got.shape == expected.shape
    return int(np.abs(got - expected).max())


def mixed_work(home: ModelStore) -> list[tuple[str, str, StepInputs, int]]:
    sd, sdxl, inpainting = (home.get(name).tag for name in ("sd", "sdxl", "inpainting"))
    image, mask = picture(), half_mask()
    return [
        (sd, "__call__", StepInputs("text2img", "a red barn", 6, 7.5, 64, 64), 11),
        (sd, "__call__", StepInputs("text2img", "a blue lake", 9, 1.0, 64, 64, scheduler="EulerDiscreteScheduler"), 12),
        (
            sd,
            "__call__",
            StepInputs(
                "text2img",
                "an old tree",
                8,
                5.0,
                64,
                64,
                negative_prompt="blurry",
                scheduler="DPMSolverMultistepScheduler",
            ),
            13,
        ),
        (sd, "img2img", StepInputs("img2img", "a city", 10, 6.0, 64, 64, strength=0.6, image=image, eta=0.5), 14),
        (
            sd,
            "inpaint",
            StepInputs("inpaint", "a door", 7, 8.0, 64, 64, strength=1.0, image=image, mask_image=mask),
            15,
        ),
        (
            sd,
            "inpaint",
            StepInputs(
                "inpaint",
                "a cat",
                8,
                3.0,
                64,
                64,
                strength=0.75,
                image=image,
                mask_image=mask,
                scheduler="EulerDiscreteScheduler",
            ),
            16,
        ),
        (
            inpainting,
            "__call__",
            StepInputs("inpaint", "a window", 6, 7.0, 64, 64, strength=1.0, image=image, mask_image=mask),
            17,
        ),
        (
            sdxl,
            "__call__",
            StepInputs(
                "text2img",
                "a lighthouse",
                5,
                5.0,
                64,
                64,
                prompt_2="in winter",
                original_size=(128, 96),
                crops_coords_top_left=(8, 8),
            ),
            18,
        ),
        (sdxl, "__call__", StepInputs("text2img", "a hill", 7, 6.0, 64, 64, negative_prompt="fog"), 19),
        (sdxl, "img2img", StepInputs("img2img", "a harbour", 8, 5.0, 64, 64, strength=0.5, image=image), 20),
        (
            sdxl,
            "inpaint",
            StepInputs("inpaint", "a boat", 6, 4.0, 64, 64, strength=0.9999, image=image, mask_image=mask),
            21,
        ),
    ]


def run_engine(engine: StepEngine, items: list[WorkItem]) -> dict[int, object]:
    """Half the items join first; the rest join two ticks later, in the middle of the others' denoising."""
    results: dict[int, object] = {}
    engine.join(items[: len(items) // 2])
    ticks = 0
    while engine.busy:
        if ticks == 2:
            engine.join(items[len(items) // 2 :])
        tick = engine.tick()
        ticks += 1
        assert not tick.failed, tick.failed
        results.update({id(done): output for done, output in tick.finished})
    return results


def test_in_float64_the_engine_is_bit_identical_to_each_solo_pipe_call(home):
    loaded = runners(home, "float64")
    engine = engine_of(loaded)
    work = mixed_work(home)
    items = [item(tag, signature, spec, seed) for tag, signature, spec, seed in work]
    results = run_engine(engine, items)
    for (tag, signature, spec, seed), queued in zip(work, items):
        difference = levels_from_solo(loaded[tag], signature, spec, seed, results[id(queued)].image)
        assert difference == 0, f"{tag} {signature} {spec.task} {spec.scheduler} differs"


def test_in_float32_each_image_is_within_one_level_of_its_solo_call(home):
    loaded = runners(home, "float32")
    engine = engine_of(loaded)
    work = mixed_work(home)
    items = [item(tag, signature, spec, seed) for tag, signature, spec, seed in work]
    results = run_engine(engine, items)
    for (tag, signature, spec, seed), queued in zip(work, items):
        assert levels_from_solo(loaded[tag], signature, spec, seed, results[id(queued)].image) <= 1


def test_a_failing_item_fails_alone_and_its_batch_mates_are_untouched(home):
    loaded = runners(home, "float32")
    engine = engine_of(loaded)
    tag = home.get("sd").tag
    specs = [StepInputs("text2img", prompt, 4, 7.5, 64, 64) for prompt in ("a fox", "poison", "a hut")]
    items = [item(tag, "__call__", spec, 30 + i) for i, spec in enumerate(specs)]
    real = engine._denoise

    def denoise(tracks):  # a fault that follows one item: the shared call fails, the poison item's own call too
        if any(track.spec.prompt == "poison" for track in tracks):
            raise RuntimeError("a kernel failed")
        return real(tracks)

    engine._denoise = denoise
    engine.join(items)
    finished, failed = {}, {}
    while engine.busy:
        tick = engine.tick()
        finished.update({id(i): out for i, out in tick.finished})
        failed.update({id(i): error for i, error in tick.failed})
    assert set(failed) == {id(items[1])} and "kernel failed" in str(failed[id(items[1])])
    for index in (0, 2):
        assert (
            levels_from_solo(loaded[tag], "__call__", specs[index], 30 + index, finished[id(items[index])].image) <= 1
        )


def test_an_item_whose_latents_become_non_finite_fails_alone(home):
    engine = engine_of(runners(home, "float32"))
    tag = home.get("sd").tag
    huge = item(tag, "__call__", StepInputs("text2img", "x", 3, 3.0e38, 64, 64), 1)  # guidance overflows float32
    fine = item(tag, "__call__", StepInputs("text2img", "x", 3, 7.5, 64, 64), 2)
    engine.join([huge, fine])
    finished, failed = [], []
    while engine.busy:
        tick = engine.tick()
        finished += [i for i, _ in tick.finished]
        failed += tick.failed
    assert finished == [fine]
    ((who, error),) = failed
    assert who is huge and isinstance(error, NumericalError)


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError on the CPU: recognised by name."""


def test_out_of_memory_evicts_the_newest_items_which_resume_where_they_were(home):
    """Through the executor: a set too big for 'memory' sheds its newest half back to the queue, with their
    latents and schedulers; they come back, finish, and still equal their solo calls."""
    loaded = runners(home, "float32")
    worker = PipelineWorker(loaded, "cpu")
    real = worker.step._denoise
    attempts = []

    def denoise(tracks):
        rows = sum(track.rows for track in tracks)
        attempts.append(rows)
        if rows > 4 and len(attempts) < 20:  # fits two CFG items; room grows back after the cool-down only
            raise OutOfMemoryError("CUDA out of memory")
        return real(tracks)

    worker.step._denoise = denoise
    tag = home.get("sd").tag
    specs = [
        StepInputs("text2img", f"a thing {i}", 5, 7.5, 64, 64, scheduler="DPMSolverMultistepScheduler")
        for i in range(4)
    ]
    items = [item(tag, "__call__", spec, 50 + i) for i, spec in enumerate(specs)]
    evictions = []
    executor = Executor([("cpu", lambda: worker)], max_batch_size=8, on_batch=lambda r: evictions.append(r))
    executor.submit(items)  # before the worker starts: all four join the first tick together
    executor.start()
    executor.wait_ready(60)
    outputs = [queued.future.result(120) for queued in items]
    executor.shutdown(10)
    assert attempts[0] == 8 and 8 not in attempts[1:]  # evicted once, never again at that size (budget lowered)
    assert executor.policy.row_budget(StepEngine.group_of(items[0].key), executor._clock()) == 4
    for index, output in enumerate(outputs):
        assert levels_from_solo(loaded[tag], "__call__", specs[index], 50 + index, output.image) <= 1


def test_an_item_finishing_just_before_another_waits_to_be_decoded_with_it(home):
    """A (4 steps) finishes a tick before B (5 steps): both leave in one decode at B's last step; C (9 steps) is
    too far off to wait for, so it is decoded alone. Each image still equals its solo call."""
    loaded = runners(home, "float32")
    engine, tag = engine_of(loaded), home.get("sd").tag
    specs = [StepInputs("text2img", f"a barn {steps}", steps, 7.5, 64, 64) for steps in (4, 5, 9)]
    a, b, c = (item(tag, "__call__", spec, 30 + i) for i, spec in enumerate(specs))
    engine.join([a, b, c])
    left, images = {}, {}
    for number in range(1, 10):
        finished = engine.tick().finished
        left[number] = [done for done, _ in finished]
        images.update({id(done): output.image for done, output in finished})
        if number == 4:
            assert engine.in_flight == 3 and engine.busy  # A waits, finished, and still counts
    assert left[4] == [] and left[5] == [a, b] and left[9] == [c] and not engine.busy
    assert all(not done for number, done in left.items() if number not in (5, 9))
    for index, done in enumerate((a, b, c)):
        assert levels_from_solo(loaded[tag], "__call__", specs[index], 30 + index, images[id(done)]) <= 1


def test_every_tick_reports_the_items_the_engine_still_holds(home):
    """Also a tick that ran no step (its set's only item was cancelled): the active-items gauge reads it."""
    engine, tag = engine_of(runners(home, "float32")), home.get("sd").tag
    large = item(tag, "__call__", StepInputs("text2img", "a barn", 4, 7.5, 64, 64), 1)
    small = item(tag, "__call__", StepInputs("text2img", "a hut", 4, 7.5, 32, 32), 2)
    engine.join([large, small])
    assert engine.tick().in_flight == 2  # the 64x64 set stepped
    small.cancel()
    tick = engine.tick()  # the 32x32 set's turn: its only item leaves, cancelled, and nothing steps
    assert [who for who, _ in tick.failed] == [small] and tick.rows == 0
    assert tick.in_flight == engine.in_flight == 1


def test_step_warm_up_failure_stops_the_worker_start(home):
    """A model the engine cannot run fails readiness loudly, not the first request."""
    worker = PipelineWorker(runners(home, "float32"), "cpu")
    tag = home.get("sd").tag
    bad = StepInputs("text2img", "x", 1, 7.5, 64, 64, scheduler="NoSuchScheduler")
    worker._warmup_work = lambda: [[item(tag, "__call__", bad, 0)]]
    with pytest.raises(RuntimeError, match="step warm-up"):
        worker.warmup()
    assert not worker.busy  # nothing of the failed warm-up is left in the engine
