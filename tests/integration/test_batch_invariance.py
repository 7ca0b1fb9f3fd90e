"""Batching never changes an image: the executor and the real tiny pipeline, all three tasks, mixed prompts and
seeds, compared with each item run alone. Also: two CPU replicas serve at the same time."""

from __future__ import annotations

import numpy as np
import pytest
from inprocess import running_server
from PIL import Image

from batching import BatchKey, Executor, WorkItem
from pipelines.worker import PipelineWorker
from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

PROMPTS = ["a red barn", "a blue lake", "an old tree", "a city at night"]


def inputs(size: int = 64) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    return image, Image.fromarray(mask, "L")


def work(tag: str) -> list[WorkItem]:
    """16 items over the three tasks: mixed prompts and seeds, each task one batch key."""
    image, mask = inputs()
    common = {"num_inference_steps": 4, "guidance_scale": 7.5, "output_type": "pil"}
    keys = {
        "__call__": BatchKey.build(tag, "__call__", {**common, "height": 64, "width": 64}),
        "img2img": BatchKey.build(tag, "img2img", {**common, "strength": 0.75}, group={"input_size": (64, 64)}),
        "inpaint": BatchKey.build(
            tag, "inpaint", {**common, "height": 64, "width": 64}, group={"input_size": (64, 64)}
        ),
    }
    items = []
    for i in range(16):
        signature = list(keys)[i % 3]
        extra = {"image": image} if signature != "__call__" else {}
        if signature == "inpaint":
            extra["mask_image"] = mask
        prompt = {"prompt": PROMPTS[i % 4], "negative_prompt": "blurry" if i % 2 else "sharp"}
        items.append(WorkItem(keys[signature], {**prompt, **extra}, seed=1000 + 37 * i))
    return items


def pixels(output) -> np.ndarray:
    return np.asarray(output.image, dtype=np.int16)


def run_batched_and_alone(worker: PipelineWorker, tag: str):
    items = work(tag)
    sizes = []
    executor = Executor([("cpu", lambda: worker)], max_batch_size=8, on_batch=lambda report: sizes.append(report.size))
    executor.submit(items)  # queued before the worker starts: batches fill deterministically
    executor.start()
    executor.wait_ready(60)
    batched = [item.future.result(120) for item in items]
    executor.shutdown(10)
    ran_in = [item.trace.batch_size for item in items]
    alone = [worker.run_batch(item.key, [item], lambda *a: True)[0] for item in work(tag)]
    return batched, alone, sizes, ran_in


@pytest.fixture(scope="module")
def model(store):
    return store.get("tiny-sd")


def test_batched_images_match_solo_images_for_all_three_tasks(model):
    worker = PipelineWorker({model.tag: model.to_runner("cpu")}, "cpu")
    batched, alone, sizes, ran_in = run_batched_and_alone(worker, model.tag)
    assert sorted(sizes) == [5, 5, 6]  # really batched: one call per task
    # Each item ran in the call of its task: the text2img call (items 0, 3, ...) held 6, the others 5.
    assert ran_in == [6 if i % 3 == 0 else 5 for i in range(16)]
    for index, (together, single) in enumerate(zip(batched, alone)):
        assert np.abs(pixels(together) - pixels(single)).max() <= 1, f"item {index} changed when batched"


def test_in_float64_batching_is_bit_identical(model):
    worker = PipelineWorker({model.tag: model.with_options(torch_dtype="float64").to_runner("cpu")}, "cpu")
    batched, alone, _, ran_in = run_batched_and_alone(worker, model.tag)
    assert min(ran_in) == 5
    for index, (together, single) in enumerate(zip(batched, alone)):
        assert np.array_equal(pixels(together), pixels(single)), f"item {index} differs in float64"


def test_two_cpu_replicas_serve_at_the_same_time(store):
    # Request batching: a step engine may take both requests into its own ticks, leaving the other replica idle.
    config = {"workers_per_device": 2, "batching": "request"}
    with running_server(store, **config) as (server, target), DiffusionClient(target) as client:
        long = [
            pb.TextToImageRequest(prompt="x", params=pb.GenerationParams(seed=s, num_inference_steps=n))
            for s, n in ((1, 120), (2, 121))
        ]  # different keys: they cannot share a call
        streams = [client.stream(request, timeout=120) for request in long]
        firsts = [next(stream) for stream in streams]  # both are running before either finishes
        assert [f.progress.step for f in firsts] == [1, 1]
        for stream in streams:
            assert list(stream)[-1].WhichOneof("event") == "text_to_image"
        assert set(server.stats.workers) == {"cpu#0", "cpu#1"}
