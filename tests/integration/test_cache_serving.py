"""`GenerationParams.cache` through a real in-process server: a request's First Block Cache, the model's default
from its stored `cache` option, `method: "none"`, the reply's step counts, and clear refusals elsewhere."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from helpers import bad_request_fields, decode
from inprocess import running_server
from test_feature_cache import SEQ

from model_store import ModelStore
from model_store.errors import StoreError
from model_store.options import parse_option
from model_store.tiny_dit import build_tiny_flux
from service.client import DiffusionClient

DEFAULT = 0.3  # the stored model default


@pytest.fixture(scope="module")
def served(tmp_path_factory, store):
    home = ModelStore(tmp_path_factory.mktemp("cache-serving"))
    home.save_model(
        "tiny-flux-fbc",
        build_tiny_flux(seed=0, cache_visible=True),
        signatures={"__call__": {"batchable": True}},
        options={"cache": f"first_block:{DEFAULT}"},
    )
    home.import_model("tiny-sd", store.get("tiny-sd").path)
    with running_server(home, tags=("tiny-flux-fbc", "tiny-sd")) as (server, target), DiffusionClient(target) as c:
        yield server, c


@pytest.fixture(scope="module")
def client(served):
    return served[1]


def direct(threshold: float | None, seed: int, steps: int) -> np.ndarray:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = build_tiny_flux(seed=0, cache_visible=True)
    if threshold is not None:
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    with torch.inference_mode():
        image = pipe(prompt="a red barn", num_inference_steps=steps, height=16, width=16, max_sequence_length=SEQ,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(("cache", "threshold"), [("first_block:0.4", 0.4), (None, DEFAULT), ("none", None)])
def test_the_request_or_the_models_default_cache_equals_diffusers_hook(client, cache, threshold):
    reply = client.text_to_image("a red barn", model="tiny-flux-fbc", seed=7, steps=8, width=16, height=16,
                                 max_sequence_length=SEQ, cache=cache)  # fmt: skip
    served = decode(reply.images[0].image.data)
    assert np.abs(served - direct(threshold, 7, 8)).max() <= 1
    if threshold is None:
        assert (reply.steps_computed, reply.steps_cached) == (0, 0)
    else:
        assert reply.steps_computed + reply.steps_cached == 8 and 0 < reply.steps_cached < 8


@pytest.mark.parametrize(
    ("model", "cache", "field"),
    [
        ("tiny-sd", "first_block:0.2", "params.cache.method"),  # a UNet: diffusers' hook has no cache context
        ("tiny-flux-fbc", "taylorseer:0.2", "params.cache.method"),
        ("tiny-flux-fbc", "first_block:-1", "params.cache.threshold"),
    ],
)
def test_a_cache_the_model_cannot_take_is_refused_naming_the_field(client, model, cache, field):
    with pytest.raises(grpc.RpcError) as caught:
        client.text_to_image("a red barn", model=model, steps=1, width=16, height=16, cache=cache)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]


def test_the_stored_cache_option_is_checked_at_import():
    assert parse_option("cache=first_block:0.25") == ("cache", "first_block:0.25")
    assert parse_option("cache=none") == ("cache", "none")
    for bad in ("cache=first_block", "cache=first_block:x", "cache=first_block:-0.1", "cache=teacache:0.2"):
        with pytest.raises(StoreError, match="first_block:THRESHOLD"):
            parse_option(bad)


def test_the_cache_steps_metric_gives_each_models_hit_ratio(served):
    server, client = served
    reply = client.text_to_image("a red barn", model="tiny-flux-fbc", seed=9, steps=8, width=16, height=16,
                                 max_sequence_length=SEQ, cache="first_block:0.4")  # fmt: skip
    assert reply.steps_cached > 0
    counted = {
        sample.labels["outcome"]: sample.value
        for metric in server.metrics.registry.collect()
        if metric.name == "diffusers_grpc_cache_steps"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["model"] == reply.model
    }
    assert counted["cached"] >= reply.steps_cached and counted["computed"] >= reply.steps_computed
