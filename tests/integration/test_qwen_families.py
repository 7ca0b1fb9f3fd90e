"""The step engine on Qwen-Image and Z-Image against the direct `pipe(...)` call: exact in float64 and within
one level in float32, with mixed steps, guidance, true_cfg_scale, seeds, prompts of different token counts,
tasks and joins in the middle of a run; and each fixture input visibly moves the image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_dit_families import item, levels_from_solo, picture, solo
from test_step_engine import engine_of, run_engine, runners

from model_store import ModelStore
from model_store.tiny_qwen import build_tiny_qwen_image, build_tiny_z_image
from pipelines.families import StepInputs, family_of

SIGNATURES = {"__call__": {"batchable": True}, "img2img": {"batchable": True}}
SIZE = 32  # Qwen-Image's VAE downsamples 4x and Z-Image's 2x; both pack 2x2: a 32 px image is 16 or 64 tokens


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    models = ModelStore(tmp_path_factory.mktemp("qwen"))
    models.save_model("qwen", build_tiny_qwen_image(seed=0), signatures=SIGNATURES)
    models.save_model("zimage", build_tiny_z_image(seed=0), signatures=SIGNATURES)
    return models


def spec(task: str, prompt: str, steps: int, guidance: float, **kwargs) -> StepInputs:
    kwargs.setdefault("max_sequence_length", 64)
    return StepInputs(task, prompt, steps, guidance, SIZE, SIZE, **kwargs)


def mixed_work(home: ModelStore) -> list[tuple[str, str, StepInputs, int]]:
    qwen, zimage = (home.get(name).tag for name in ("qwen", "zimage"))
    image = picture().resize((SIZE, SIZE))
    return [
        (qwen, "__call__", spec("text2img", "a red barn", 4, 1.0), 11),
        (qwen, "__call__", spec("text2img", "a blue lake under a stormy sky", 6, 1.0, negative_prompt="blurry"), 12),
        (qwen, "__call__", spec("text2img", "an old tree", 5, 1.0, negative_prompt="dark", true_cfg_scale=2.5), 13),
        (qwen, "__call__", spec("text2img", "a cat", 3, 1.0, negative_prompt="dog", true_cfg_scale=1.0), 14),
        (qwen, "img2img", spec("img2img", "a city at night", 7, 1.0, strength=0.6, image=image), 15),
        (
            qwen,
            "img2img",
            spec("img2img", "a city", 5, 1.0, strength=0.9, image=image, negative_prompt="rain", true_cfg_scale=3.0),
            16,
        ),
        (qwen, "__call__", spec("text2img", "a very long prompt about many things", 4, 1.0, max_sequence_length=8), 17),
        (zimage, "__call__", spec("text2img", "a hill", 3, 0.0), 18),  # Turbo-style: no guidance, one row
        (zimage, "__call__", spec("text2img", "a harbour with boats", 5, 5.0), 19),  # the default "" negative
        (zimage, "__call__", spec("text2img", "a lighthouse", 4, 3.0, negative_prompt="fog"), 20),
        (zimage, "img2img", spec("img2img", "a forest", 6, 4.0, strength=0.7, image=image, negative_prompt="snow"), 21),
        (zimage, "img2img", spec("img2img", "a road", 4, 0.0, strength=0.5, image=image), 22),
    ]


def run_mixed(home: ModelStore, dtype: str) -> tuple[dict, list, dict]:
    loaded = runners(home, dtype)
    work = mixed_work(home)
    items = [item(loaded, tag, signature, s, seed) for tag, signature, s, seed in work]
    results = run_engine(engine_of(loaded), items)
    return loaded, work, [results[id(queued)].image for queued in items]


def test_qwen_image_and_z_image_signatures_are_families_the_engine_serves(home):
    for model in home.list_models():
        assert family_of(model.pipeline_type()) is not None, model.name


def test_in_float64_the_engine_equals_each_solo_pipe_call(home):
    loaded, work, images = run_mixed(home, "float64")
    for (tag, signature, s, seed), image in zip(work, images):
        difference = levels_from_solo(loaded[tag], signature, s, seed, image)
        assert difference == 0, f"{signature} {s.prompt!r} differs by {difference}"


def test_in_float32_each_image_is_within_one_level_of_its_solo_call(home):
    loaded, work, images = run_mixed(home, "float32")
    for (tag, signature, s, seed), image in zip(work, images):
        assert levels_from_solo(loaded[tag], signature, s, seed, image) <= 1, (signature, s.prompt)


def test_rows_of_different_text_lengths_share_one_call_and_true_cfg_adds_a_row(home):
    loaded = runners(home, "float32")
    qwen, zimage = home.get("qwen").tag, home.get("zimage").tag
    short = item(loaded, qwen, "__call__", spec("text2img", "a", 2, 1.0), 1)
    longer = item(loaded, qwen, "__call__", spec("text2img", "a dog on the beach at dawn", 2, 1.0), 2)
    guided = item(loaded, qwen, "__call__", spec("text2img", "b", 2, 1.0, negative_prompt="a long negative"), 3)
    turbo = item(loaded, zimage, "__call__", spec("text2img", "c", 2, 0.0), 4)
    guided_z = item(loaded, zimage, "__call__", spec("text2img", "a much longer prompt here", 2, 3.0), 5)
    engine = engine_of(loaded)
    engine.join([short, longer, guided, turbo, guided_z])
    assert engine.load(short.key)[1:] == (3, 4)  # three items, 1 + 1 + 2 rows, in one set
    assert engine.group_of(short.key) == engine.group_of(longer.key) == engine.group_of(guided.key)
    assert engine.load(turbo.key)[1:] == (2, 3)
    assert engine.group_of(turbo.key) == engine.group_of(guided_z.key)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("qwen", {"prompt": "a blue lake"}),
        ("qwen", {"negative_prompt": "blurry"}),  # true CFG at the pipeline's default scale, 4.0
        ("qwen", {"negative_prompt": "blurry", "true_cfg_scale": 2.0}),
        ("zimage", {"prompt": "a blue lake"}),
        ("zimage", {"negative_prompt": "blurry"}),
        ("zimage", {"guidance_scale": 2.0}),
    ],
)
def test_every_input_of_the_fixtures_visibly_moves_the_image(home, name, change):
    runner = runners(home, "float32")[home.get(name).tag]
    base = spec("text2img", "a red barn", 4, 5.0 if name == "zimage" else 1.0)
    before = np.asarray(solo(runner, "__call__", base, 0), dtype=np.int16)
    after = np.asarray(solo(runner, "__call__", StepInputs(**{**vars(base), **change}), 0), dtype=np.int16)
    assert np.abs(before - after).max() >= 4, change


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the direct call's second LoRA
@pytest.mark.parametrize(("name", "builder", "guidance"), [("qwen", build_tiny_qwen_image, 1.0),
                                                           ("zimage", build_tiny_z_image, 3.0)])  # fmt: skip
def test_items_with_different_loras_share_calls_and_each_equals_its_direct_call(
    home, tmp_path, name, builder, guidance
):
    """Per-row LoRAs on these transformers: the same PEFT hooks as the UNet's, rows of any text length."""
    from model_store.tiny_families import save_tiny_lora
    from pipelines.adapters import LORA, Adapter

    loaded = runners(home, "float32")
    tag = home.get(name).tag
    files = {
        lora: save_tiny_lora(loaded[tag].pipeline, tmp_path / lora, seed=seed, scale_up=4.0)
        for seed, lora in enumerate(("red", "blue"), 1)
    }
    red, blue = (Adapter(lora, LORA, str(path)) for lora, path in files.items())
    half_blue = dataclasses.replace(blue, weight=0.5)
    work = [
        (spec("text2img", "a red barn", 4, guidance, loras=(red,)), 31),
        (spec("text2img", "a red barn in the snow at night", 5, guidance, loras=(half_blue,)), 32),
        (spec("text2img", "a red barn", 4, guidance), 33),  # no LoRA, in the same calls
    ]
    items = [item(loaded, tag, "__call__", s, seed) for s, seed in work]
    results = run_engine(engine_of(loaded), items)
    direct = builder(seed=0)  # the same weights, LoRAs loaded the user's way
    for lora, path in files.items():
        direct.load_lora_weights(str(path), adapter_name=lora)
    for s, seed in work:
        if s.loras:
            direct.set_adapters([s.loras[0].name], [s.loras[0].weight])
        else:
            direct.disable_lora()
        with torch.inference_mode():
            expected = direct(prompt=s.prompt, num_inference_steps=s.num_inference_steps, guidance_scale=guidance,
                              height=SIZE, width=SIZE, max_sequence_length=64,
                              generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
        if s.loras:
            direct.enable_lora()
        got = np.asarray(results[id(items[work.index((s, seed))])].image, dtype=np.int16)
        assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1, s.loras
    with_lora = np.asarray(results[id(items[0])].image, dtype=np.int16)
    without = np.asarray(results[id(items[2])].image, dtype=np.int16)
    assert np.abs(with_lora - without).max() >= 4  # the LoRA visibly applied
