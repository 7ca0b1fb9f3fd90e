"""A tiny Stable Diffusion pipeline with random weights, built offline and deterministically.

Tests, benchmarks and demos need a real `StableDiffusionPipeline` (same classes, same call path, same
save/load layout as a hub checkpoint) without network access or gigabytes of weights. This module builds
one of about 2 M parameters ("f8": a VAE that downscales by 8 like real SD, 64x64 native images) whose
weights depend only on the seed, and a small CLIP-style byte-level BPE tokenizer learned from a built-in
corpus, so that no file has to be shipped or downloaded.

Heavy libraries (torch, diffusers, transformers) are imported inside the functions so importing this
module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from transformers import CLIPTokenizer

DEMO_NAME = "tiny-sd"  # the tag `models create-demo` imports, the default of the demo and the tests
# All three typed tasks, batchable along dim 0: img2img and inpaint are derived with from_pipe.
DEMO_SIGNATURES = {
    "__call__": {"batchable": True, "batch_dim": 0},
    "img2img": {"batchable": True, "batch_dim": 0},
    "inpaint": {"batchable": True, "batch_dim": 0},
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's context length: prompts are padded/truncated to it by the pipeline.
NUM_MERGES = 400

# Seed offsets, one per module, so each module's weights depend only on (seed, module) and not on the
# order in which modules are built or on what else consumed random numbers before.
_UNET_SEED, _VAE_SEED, _TEXT_ENCODER_SEED = 0, 1, 2

# Small prompt-like English text the BPE merges are learned from. Changing it changes the vocabulary,
# hence the text encoder's embedding shape and every seeded weight after it: treat it as frozen.
_CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus, dramatic lighting.
a painting of a small red house next to a river in the mountains at sunset, oil on canvas, warm colors.
a portrait of a young woman with long brown hair wearing a blue dress, soft light, studio photograph.
a cute cat sitting on a wooden table in the kitchen, morning light through the window, realistic photo.
a dog running on the beach with the ocean and the sky in the background, golden hour, wide angle lens.
an old castle on a hill surrounded by a dark forest under a stormy sky, fantasy art, concept art.
a futuristic city at night with neon lights, flying cars and tall buildings, cyberpunk, digital art.
a bowl of fresh fruit with apples, oranges and grapes on a white table, still life, natural lighting.
a watercolor painting of flowers in a garden, spring, beautiful colors, trending on artstation.
the view of a snowy mountain landscape with a frozen lake and pine trees, winter morning, photography.
a close up photo of a red rose with water drops on the petals, macro photography, shallow depth of field.
an illustration of a dragon flying over a medieval village, epic fantasy, highly detailed painting.
a man reading a book in a cozy library with a fireplace, warm lighting, cinematic, film grain.
a green forest path with tall trees and sunlight coming through the leaves, peaceful nature scene.
a boat sailing on a calm sea at sunrise, orange and pink sky, reflections on the water, painting.
a robot playing the piano in an empty concert hall, dramatic light, science fiction, 3d render.
a bird standing on a branch with a blue sky behind it, wildlife photography, high resolution.
a street in paris with cafes and people walking in the rain, evening, impressionist painting style.
a cup of coffee and a croissant on a table near the window, breakfast, soft morning light, photo.
a child flying a kite in a field of yellow flowers under a bright summer sky, happy, colorful.
"""
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from every byte to a printable character, so BPE never sees whitespace/control bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges: repeatedly merge the most frequent adjacent pair (ties: smallest pair first)."""
    byte_map = _bytes_to_unicode()
    word_counts = Counter(_PRETOKENIZE.findall(corpus.lower()))
    words: dict[tuple[str, ...], int] = {}
    for word, count in word_counts.items():
        chars = [byte_map[b] for b in word.encode("utf-8")]
        words[(*chars[:-1], chars[-1] + END_OF_WORD)] = count

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP layout: 256 byte chars, the same with `</w>`, merged tokens, then BOS and EOS last."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    merges = _learn_merges(_CORPUS, NUM_MERGES)
    tokens += [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))  # Two merges can spell the same token; keep the first id.
    return vocab, tuple(merges)


def write_tokenizer_files(directory: str | os.PathLike[str]) -> None:
    """Write a CLIP-style byte-level BPE vocab.json + merges.txt into directory (created if needed)."""
    vocab, merges = _vocab_and_merges()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _build_tokenizer() -> CLIPTokenizer:
    """Load through `from_pretrained`, as a checkpoint would; the tokenizer keeps no file open afterwards."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        write_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH)


def build_tiny_pipeline(seed: int = 0, torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Build the tiny 'f8' text-to-image pipeline: random weights, offline, byte-identical for the same seed.

    The caller's global torch RNG state is left untouched.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    # The full module path: through `diffusers` mypy sees the dummy placeholder class instead.
    from transformers import CLIPTextModel

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _UNET_SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + _VAE_SEED)
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
        torch.manual_seed(seed + _TEXT_ENCODER_SEED)
        text_config = clip_text_config(
            tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return finish_pipeline(sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler), torch_dtype)


def save_demo(store: Any, name: str = DEMO_NAME, seed: int = 0, **kwargs: Any) -> Any:
    """Build the tiny pipeline and store it as the demo model (`store` is a `ModelStore`)."""
    return store.save_model(name, build_tiny_pipeline(seed=seed), signatures=DEMO_SIGNATURES, **kwargs)


def clip_text_config(tokenizer: Any, **shape: Any) -> Any:
    """A CLIP text encoder's config of the given shape, for our tokenizer: its vocabulary, special tokens and
    prompt length."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        max_position_embeddings=MAX_LENGTH,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )


def sd_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of these parts, without a safety checker."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    # Typed Any: diffusers' annotations (a scheduler enum, non-Optional safety checker) reject valid values.
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def finish_pipeline(pipe: Any, torch_dtype: torch.dtype | None) -> Any:
    """Eval mode, as from_pretrained leaves a pipeline, so a built and a reloaded one behave alike; the cast to
    `torch_dtype` after seeding in float32, so every dtype shares the same weights; no progress bars."""
    import torch

    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        component.eval()
        if torch_dtype is not None:
            # Plain nn.Module.to: the diffusers 0.42 override warns on every dtype cast, even when no module is
            # pinned to float32.
            torch.nn.Module.to(component, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
