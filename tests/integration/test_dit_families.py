"""The step engine on the flow-matching transformer families (FLUX.1 dev and schnell, SD3) against the direct
`pipe(...)` call: bit-identical in float64 and within one level in float32, with mixed steps, guidance,
true_cfg_scale, seeds, prompts, tasks and joins in the middle of a run; and the tiny fixtures' inputs each
visibly move the image, so a dropped one would show."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from test_step_engine import engine_of, run_engine, runners  # the same engine harness as SD's

from batching import WorkItem
from model_store import ModelStore
from model_store.tiny_dit import build_tiny_flux, build_tiny_sd3
from pipelines.families import StepInputs, family_of
from pipelines.step_engine import STEP_INPUT, step_key

SIGNATURES = {"__call__": {"batchable": True}, "img2img": {"batchable": True}}
SEQ = 16  # max_sequence_length: short prompts pad to it; items with another length get a set of their own


def picture(seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    models = ModelStore(tmp_path_factory.mktemp("dit"))
    models.save_model("flux", build_tiny_flux(seed=0), signatures=SIGNATURES)
    models.save_model("schnell", build_tiny_flux(seed=1, guidance_embeds=False), signatures=SIGNATURES)
    models.save_model("sd3", build_tiny_sd3(seed=0), signatures=SIGNATURES)
    return models


def item(loaded: dict, tag: str, signature: str, spec: StepInputs, seed: int) -> WorkItem:
    pipeline_class = type(loaded[tag].pipeline)
    return WorkItem(step_key(tag, signature, pipeline_class, spec), {STEP_INPUT: spec}, seed=seed)


OPTIONAL = (
    "negative_prompt",
    "prompt_2",
    "negative_prompt_2",
    "prompt_3",
    "negative_prompt_3",
    "true_cfg_scale",
    "max_sequence_length",
)


def solo(runner, signature: str, spec: StepInputs, seed: int) -> Image.Image:
    """The direct diffusers call for this request alone."""
    pipe = runner.signatures[signature].pipeline
    kwargs = {
        "prompt": spec.prompt,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "height": spec.height,
        "width": spec.width,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    kwargs.update({name: getattr(spec, name) for name in OPTIONAL if getattr(spec, name) is not None})
    if spec.task == "img2img":
        kwargs.update(image=spec.image, strength=spec.strength)
    own = pipe.scheduler
    pipe.scheduler = type(own).from_config(own.config)  # a fresh one, as each engine item has
    try:
        with torch.inference_mode():
            return pipe(**kwargs).images[0]
    finally:
        pipe.scheduler = own


def levels_from_solo(runner, signature: str, spec: StepInputs, seed: int, image: Image.Image) -> int:
    expected = np.asarray(solo(runner, signature, spec, seed), dtype=np.int16)
    got = np.asarray(image, dtype=np.int16)
    assert got.shape == expected.shape
    return int(np.abs(got - expected).max())


def spec(task: str, prompt: str, steps: int, guidance: float, **kwargs) -> StepInputs:
    kwargs.setdefault("max_sequence_length", SEQ)
    return StepInputs(task, prompt, steps, guidance, 16, 16, **kwargs)


def mixed_work(home: ModelStore) -> list[tuple[str, str, StepInputs, int]]:
    flux, schnell, sd3 = (home.get(name).tag for name in ("flux", "schnell", "sd3"))
    image = picture()
    return [
        (flux, "__call__", spec("text2img", "a red barn", 4, 3.5), 11),
        (flux, "__call__", spec("text2img", "a blue lake", 6, 8.0, prompt_2="in fog"), 12),
        (flux, "__call__", spec("text2img", "an old tree", 5, 2.0, negative_prompt="blurry", true_cfg_scale=4.0), 13),
        (flux, "__call__", spec("text2img", "a cat", 3, 3.5, negative_prompt="dark", true_cfg_scale=1.0), 14),
        (flux, "img2img", spec("img2img", "a city", 7, 5.0, strength=0.6, image=image), 15),
        (
            flux,
            "img2img",
            spec("img2img", "a city", 5, 3.0, strength=0.9, image=image, true_cfg_scale=3.0, negative_prompt="rain"),
            16,
        ),
        (flux, "__call__", spec("text2img", "a long text", 4, 3.5, max_sequence_length=24), 17),  # a set of its own
        (schnell, "__call__", spec("text2img", "a hill", 2, 0.0), 18),
        (schnell, "__call__", spec("text2img", "a harbour", 4, 0.0, negative_prompt="ugly", true_cfg_scale=2.5), 19),
        (sd3, "__call__", spec("text2img", "a lighthouse", 5, 7.0, prompt_3="in winter"), 20),
        (sd3, "__call__", spec("text2img", "a boat", 4, 1.0), 21),  # no guidance: one row
        (sd3, "__call__", spec("text2img", "a road", 6, 4.5, negative_prompt="night", prompt_2="at noon"), 22),
        (sd3, "img2img", spec("img2img", "a forest", 6, 5.0, strength=0.7, image=image, negative_prompt_3="snow"), 23),
    ]


def run_mixed(home: ModelStore, dtype: str) -> tuple[dict, list, list[WorkItem], dict]:
    loaded = runners(home, dtype)
    work = mixed_work(home)
    items = [item(loaded, tag, signature, s, seed) for tag, signature, s, seed in work]
    return loaded, work, items, run_engine(engine_of(loaded), items)


def test_every_dit_signature_is_a_family_the_engine_serves(home):
    for model in home.list_models():
        family = family_of(model.pipeline_type())
        assert family is not None, model.name


def test_in_float64_the_engine_is_bit_identical_to_each_solo_pipe_call(home):
    loaded, work, items, results = run_mixed(home, "float64")
    for (tag, signature, s, seed), queued in zip(work, items):
        difference = levels_from_solo(loaded[tag], signature, s, seed, results[id(queued)].image)
        assert difference == 0, f"{tag} {signature} {s.prompt!r} differs by {difference}"


def test_in_float32_each_image_is_within_one_level_of_its_solo_call(home):
    loaded, work, items, results = run_mixed(home, "float32")
    for (tag, signature, s, seed), queued in zip(work, items):
        assert levels_from_solo(loaded[tag], signature, s, seed, results[id(queued)].image) <= 1, (tag, s.prompt)


def test_true_cfg_items_put_two_rows_in_the_call_and_text_length_splits_the_sets(home):
    loaded = runners(home, "float32")
    flux = home.get("flux").tag
    plain = item(loaded, flux, "__call__", spec("text2img", "a", 2, 3.5), 1)
    guided = item(loaded, flux, "__call__", spec("text2img", "b", 2, 3.5, negative_prompt="c", true_cfg_scale=2.0), 2)
    longer = item(loaded, flux, "__call__", spec("text2img", "d", 2, 3.5, max_sequence_length=24), 3)
    engine = engine_of(loaded)
    engine.join([plain, guided, longer])
    assert engine.load(plain.key)[1:] == (2, 3)  # two items, 1 + 2 rows
    assert engine.load(longer.key)[1:] == (1, 1)
    assert engine.group_of(plain.key) != engine.group_of(longer.key)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("flux", {"prompt": "a blue lake"}),
        ("flux", {"prompt_2": "an old tree"}),
        ("flux", {"guidance_scale": 8.0}),
        ("flux", {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),
        ("sd3", {"prompt_2": "an old tree"}),
        ("sd3", {"prompt_3": "an old tree"}),
        ("sd3", {"negative_prompt_3": "blurry"}),
        ("sd3", {"guidance_scale": 3.0}),
    ],
)
def test_every_input_of_the_fixtures_visibly_moves_the_image(home, name, change):
    runner = runners(home, "float32")[home.get(name).tag]
    base = spec(
        "text2img", "a red barn", 4, 5.0 if name == "sd3" else 3.5, negative_prompt="fog" if name == "sd3" else None
    )
    before = np.asarray(solo(runner, "__call__", base, 0), dtype=np.int16)
    after = np.asarray(solo(runner, "__call__", StepInputs(**{**vars(base), **change}), 0), dtype=np.int16)
    assert np.abs(before - after).max() >= 4, change


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the direct call's second LoRA
def test_flux_items_with_different_loras_share_calls_and_each_equals_its_direct_call(home, tmp_path):
    """Per-row LoRAs on a transformer: the same PEFT hooks as the UNet's, on the pipeline's denoiser."""
    from model_store.tiny_families import save_tiny_lora
    from pipelines.adapters import LORA, Adapter

    loaded = runners(home, "float32")
    flux = home.get("flux").tag
    pipe = loaded[flux].pipeline
    files = {name: save_tiny_lora(pipe, tmp_path / name, seed=seed) for seed, name in enumerate(("red", "blue"), 1)}
    red, blue = (Adapter(name, LORA, str(path)) for name, path in files.items())
    work = [
        (spec("text2img", "a red barn", 4, 3.5, loras=(red,)), 31),
        (spec("text2img", "a red barn", 5, 3.5, loras=(dataclasses.replace(blue, weight=0.5),)), 32),
        (spec("text2img", "a red barn", 4, 3.5), 33),  # no LoRA, in the same calls
    ]
    engine = engine_of(loaded)
    items = [item(loaded, flux, "__call__", s, seed) for s, seed in work]
    results = run_engine(engine, items)
    direct = build_tiny_flux(seed=0)  # the same weights, LoRAs loaded the user's way
    for name, path in files.items():
        direct.load_lora_weights(str(path), adapter_name=name)
    for (s, seed), queued in zip(work, items):
        if s.loras:
            direct.set_adapters([s.loras[0].name], [s.loras[0].weight])
        else:
            direct.disable_lora()
        with torch.inference_mode():
            expected = direct(prompt=s.prompt, num_inference_steps=s.num_inference_steps, guidance_scale=3.5,
                              height=16, width=16, max_sequence_length=SEQ,
                              generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
        if s.loras:
            direct.enable_lora()
        got = np.asarray(results[id(queued)].image, dtype=np.int16)
        assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1, s.loras
    with_lora = np.asarray(results[id(items[0])].image, dtype=np.int16)
    without = np.asarray(results[id(items[2])].image, dtype=np.int16)
    assert np.abs(with_lora - without).mean() > 2  # the LoRA visibly applied
