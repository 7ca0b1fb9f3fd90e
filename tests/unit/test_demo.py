"""The tiny demo pipeline: deterministic, runnable, tokenizes anything, and survives save/load offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_store.demo import build_tiny_pipeline, write_tokenizer_files

PROMPT = "a photograph of a red house in the mountains"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def _generate(pipeline, seed: int = 0) -> np.ndarray:
    return pipeline(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=[torch.Generator().manual_seed(seed)],
    ).images


def test_same_seed_gives_identical_weights(pipe):
    other = build_tiny_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert mine.keys() == theirs.keys()
        for key, tensor in mine.items():
            assert tensor.dtype == theirs[key].dtype
            assert torch.equal(tensor, theirs[key]), f"{name}.{key} differs"


def test_other_seed_gives_other_weights_and_rng_is_untouched(pipe):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    other = build_tiny_pipeline(seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(pipe.unet.conv_in.weight, other.unet.conv_in.weight)


def test_torch_dtype_casts_the_same_weights(pipe):
    half = build_tiny_pipeline(seed=0, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    assert torch.equal(half.unet.conv_in.weight, pipe.unet.conv_in.weight.to(torch.bfloat16))
    assert pipe.unet.dtype == torch.float32


def test_shape_matches_f8(pipe):
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert 1_000_000 < params < 4_000_000
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.tokenizer.model_max_length == 77


def test_text_to_image_runs(pipe):
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_tokenizer_handles_any_text(pipe):
    tokenizer = pipe.tokenizer
    ids = tokenizer("héllo 世界 🙂").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]  # byte-level: every character is covered
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo 世界 🙂"

    long_prompt = " ".join(["mountain", "river", "castle", "sunset", "photograph"] * 100)
    batch = tokenizer(long_prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (1, 77)

    text = "a photograph of the old castle"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_files_are_deterministic(tmp_path):
    write_tokenizer_files(tmp_path / "a")
    write_tokenizer_files(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    assert {"<|startoftext|>", "<|endoftext|>", "a", "a</w>"} <= vocab.keys()
    merges = (tmp_path / "a" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) > 200


def test_save_and_reload_gives_same_image(pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe.save_pretrained(tmp_path)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.safety_checker is None
    np.testing.assert_array_equal(_generate(reloaded), _generate(pipe))
