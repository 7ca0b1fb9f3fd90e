"""The step engine on FLUX.1 Kontext editing against the direct `pipe(...)` call: exact in float64, with mixed
steps, guidance, true CFG, seeds and references, and joins in the middle of a run; items whose references
share a size share each denoiser call."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from test_dit_families import item
from test_step_engine import engine_of, run_engine, runners

from model_store import ModelStore
from model_store.tiny_dit import build_tiny_flux_kontext
from pipelines.families import StepInputs

SEQ = 16


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    models = ModelStore(tmp_path_factory.mktemp("kontext"))
    models.save_model("kontext", build_tiny_flux_kontext(seed=0), signatures={"__call__": {"batchable": True}})
    return models


def edit(prompt: str, steps: int, guidance: float, reference: Image.Image, **kwargs) -> StepInputs:
    return StepInputs(
        "edit", prompt, steps, guidance, *reference.size[::-1], references=(reference,), size_given=False,
        max_sequence_length=SEQ, **kwargs,
    )  # fmt: skip


def solo(runner, spec: StepInputs, seed: int) -> np.ndarray:
    """The direct call for this request alone, without a size, as the request left it."""
    pipe = runner.signatures["__call__"].pipeline
    optional = {"negative_prompt": spec.negative_prompt, "true_cfg_scale": spec.true_cfg_scale}
    with torch.inference_mode():
        image = pipe(
            prompt=spec.prompt, image=spec.references[0], num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale, max_sequence_length=SEQ,
            generator=torch.Generator("cpu").manual_seed(seed),
            **{name: value for name, value in optional.items() if value is not None},
        ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


WHITE, BLACK = Image.new("RGB", (64, 48), (255, 255, 255)), Image.new("RGB", (64, 48), (0, 0, 0))
TALL = Image.new("RGB", (48, 64), (0, 128, 255))  # another reference size: a set of its own


def test_in_float64_kontext_items_share_calls_and_each_equals_its_solo_call(home):
    loaded = runners(home, "float64")
    tag = home.get("kontext").tag
    work = [  # the first runs alone for two ticks; the other joins for its last step (float64 at 1 MP: two items)
        (edit("make it blue", 3, 6.0, BLACK, negative_prompt="blurry", true_cfg_scale=2.0), 2),
        (edit("make it red", 1, 3.5, WHITE), 1),
    ]
    items = [item(loaded, tag, "__call__", spec, seed) for spec, seed in work]
    tall = item(loaded, tag, "__call__", edit("make it snow", 2, 3.5, TALL), 4)
    probe = engine_of(loaded)
    probe.join([*items, tall])
    assert probe.load(items[0].key)[1:] == (2, 3)  # two items, 2 + 1 rows, in one call
    assert probe.group_of(tall.key) != probe.group_of(items[0].key)  # another reference size: a set of its own
    results = run_engine(engine_of(loaded), items)
    for (spec, seed), queued in zip(work, items):
        served = np.asarray(results[id(queued)].image, dtype=np.int16)
        expected = solo(loaded[tag], spec, seed)
        assert served.shape == expected.shape == (1024, 1024, 3)
        assert np.abs(served - expected).max() == 0, spec.prompt


def test_kontext_keeps_a_size_the_client_gives_as_its_aspect_ratio_at_one_megapixel(home):
    loaded = runners(home, "float32")
    tag = home.get("kontext").tag
    spec = dataclasses.replace(edit("make it red", 1, 3.5, WHITE), height=32, width=64, size_given=True)
    engine = engine_of(loaded)
    engine.join([item(loaded, tag, "__call__", spec, 5)])
    finished = []
    while engine.busy:
        finished += engine.tick().finished
    pipe = loaded[tag].signatures["__call__"].pipeline
    own = pipe(prompt="make it red", image=WHITE, height=32, width=64, num_inference_steps=1, max_sequence_length=SEQ,
               generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    assert [output.image.size for _, output in finished] == [own.size] == [(1440, 704)]  # at max_area, 2:1
