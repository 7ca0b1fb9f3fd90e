"""Per-row First Block Cache on the step engine against diffusers' own hook: each cached item equals the direct
call with `apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=t))`, whatever shares its
calls (other thresholds, no cache, true CFG, other steps, joins mid-run, per-row LoRAs), with hits and misses
seen; and the steps it reused are reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_step_engine import engine_of, run_engine, runners

from batching import WorkItem
from model_store import ModelStore
from model_store.tiny_dit import build_tiny_flux
from model_store.tiny_qwen import build_tiny_qwen_image
from pipelines.families import StepInputs
from pipelines.step_engine import STEP_INPUT, step_key

SEQ = 16


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    models = ModelStore(tmp_path_factory.mktemp("cache"))
    models.save_model("flux", build_tiny_flux(seed=0, cache_visible=True), signatures={"__call__": {"batchable": True}})
    models.save_model("qwen", build_tiny_qwen_image(seed=0), signatures={"__call__": {"batchable": True}})
    return models


def spec(prompt: str, steps: int, threshold: float | None, **kwargs) -> StepInputs:
    return StepInputs("text2img", prompt, steps, 3.5, 16, 16, max_sequence_length=SEQ, cache_threshold=threshold,
                      **kwargs)  # fmt: skip


def direct(s: StepInputs, seed: int) -> np.ndarray:
    """The user's way: a pipeline of the same weights with diffusers' hook on its transformer."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = build_tiny_flux(seed=0, cache_visible=True)
    if s.cache_threshold is not None:
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=s.cache_threshold))
    optional = {"negative_prompt": s.negative_prompt, "true_cfg_scale": s.true_cfg_scale}
    with torch.inference_mode():
        image = pipe(
            prompt=s.prompt, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, height=16,
            width=16, max_sequence_length=SEQ, generator=torch.Generator("cpu").manual_seed(seed),
            **{name: value for name, value in optional.items() if value is not None},
        ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


WORK = [
    (spec("a red barn", 8, 0.2), 1),
    (spec("a red barn", 8, 0.4), 2),
    (spec("a blue lake", 6, None), 3),  # no cache, in the same calls
    (spec("an old tree", 8, 0.3, negative_prompt="blurry", true_cfg_scale=3.0), 4),  # two rows, two states
    (spec("a cat", 7, 0.8), 5),
]


def test_each_cached_item_equals_diffusers_hook_whatever_shares_its_calls(home):
    loaded = runners(home, "float32")
    tag = home.get("flux").tag
    pipeline_class = type(loaded[tag].pipeline)
    items = [WorkItem(step_key(tag, "__call__", pipeline_class, s), {STEP_INPUT: s}, seed=seed) for s, seed in WORK]
    results = run_engine(engine_of(loaded), items)
    reused = []
    for (s, seed), queued in zip(WORK, items):
        output = results[id(queued)]
        served = np.asarray(output.image, dtype=np.int16)
        assert np.abs(served - direct(s, seed)).max() <= 1, (s.prompt, s.cache_threshold)
        if s.cache_threshold is None:
            assert (output.steps_computed, output.steps_cached) == (None, None)
        else:
            assert output.steps_computed + output.steps_cached == s.num_inference_steps
            reused.append(output.steps_cached)
    assert any(0 < count < 8 for count in reused), reused  # hits and misses both seen
    uncached = direct(spec("a red barn", 8, None), 1)
    assert np.abs(np.asarray(results[id(items[1])].image, dtype=np.int16) - uncached).max() >= 4  # reuse shows


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the direct call's second LoRA
def test_cached_rows_keep_their_own_loras_in_the_sub_batch(home, tmp_path):
    """Rows that compute run their tail blocks as a gathered sub-batch: each must keep its own LoRA there."""
    import dataclasses

    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    from model_store.tiny_families import save_tiny_lora
    from pipelines.adapters import LORA, Adapter

    loaded = runners(home, "float32")
    tag = home.get("flux").tag
    files = {name: save_tiny_lora(loaded[tag].pipeline, tmp_path / name, seed=i) for i, name in enumerate("ab", 1)}
    a, b = (Adapter(name, LORA, str(path)) for name, path in files.items())
    work = [
        (spec("a red barn", 8, 0.3, loras=(a,)), 11),
        (spec("a red barn", 8, 0.1, loras=(dataclasses.replace(b, weight=0.6),)), 12),
        (spec("a red barn", 8, 0.5), 13),
    ]
    pipeline_class = type(loaded[tag].pipeline)
    items = [WorkItem(step_key(tag, "__call__", pipeline_class, s), {STEP_INPUT: s}, seed=seed) for s, seed in work]
    results = run_engine(engine_of(loaded), items)
    for s, seed in work:
        pipe = build_tiny_flux(seed=0, cache_visible=True)
        for name, path in files.items():
            pipe.load_lora_weights(str(path), adapter_name=name)
        if s.loras:
            pipe.set_adapters([s.loras[0].name], [s.loras[0].weight])
        else:
            pipe.disable_lora()
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=s.cache_threshold))
        with torch.inference_mode():
            generator = torch.Generator("cpu").manual_seed(seed)
            expected = pipe(prompt=s.prompt, num_inference_steps=8, guidance_scale=3.5, height=16, width=16,
                            max_sequence_length=SEQ, generator=generator).images[0]  # fmt: skip
        served = results[id(items[work.index((s, seed))])]
        assert np.abs(np.asarray(served.image, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert len({results[id(queued)].steps_cached for queued in items}) > 1  # the rows decided apart


def test_qwen_image_rows_of_any_text_length_each_equal_diffusers_hook(home):
    """Qwen-Image's conditional and negative passes are two cache contexts: two rows, two states, padded text."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    loaded = runners(home, "float32")
    tag = home.get("qwen").tag
    work = [
        (StepInputs("text2img", "a red barn", 8, 1.0, 32, 32, cache_threshold=0.8), 21),
        (StepInputs("text2img", "a blue lake under a stormy sky", 8, 1.0, 32, 32, cache_threshold=0.4), 22),
        (StepInputs("text2img", "an old tree", 7, 1.0, 32, 32, negative_prompt="dark", cache_threshold=0.8), 23),
        (StepInputs("text2img", "a cat", 6, 1.0, 32, 32), 24),
    ]
    pipeline_class = type(loaded[tag].pipeline)
    items = [WorkItem(step_key(tag, "__call__", pipeline_class, s), {STEP_INPUT: s}, seed=seed) for s, seed in work]
    results = run_engine(engine_of(loaded), items)
    for (s, seed), queued in zip(work, items):
        pipe = build_tiny_qwen_image(seed=0)
        if s.cache_threshold is not None:
            apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=s.cache_threshold))
        negative = {"negative_prompt": s.negative_prompt} if s.negative_prompt else {}
        with torch.inference_mode():
            expected = pipe(prompt=s.prompt, num_inference_steps=s.num_inference_steps, height=32, width=32,
                            generator=torch.Generator("cpu").manual_seed(seed), **negative).images[0]  # fmt: skip
        served = np.asarray(results[id(queued)].image, dtype=np.int16)
        assert np.abs(served - np.asarray(expected, dtype=np.int16)).max() <= 1, s.prompt
    assert 0 < results[id(items[0])].steps_cached < 8
