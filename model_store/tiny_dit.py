"""Tiny random-weight FLUX.1 and SD3 pipelines, built offline like the demo model, for tests and the bench.

Shapes follow diffusers' own tests (`get_dummy_components()` of tests/pipelines/flux and
stable_diffusion_3): one-block transformers, a one-block VAE (no downsampling), a CLIP text encoder of 32
hidden units and a T5 of `T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, ...)`. The hub's
tokenizers are replaced by ones this module writes: the demo's byte-level CLIP BPE, and a T5 Unigram over the
same corpus (`build_t5_tokenizer`), wrapped as `T5TokenizerFast`.

Random weights leave the conditioning nearly inert, so the builders scale it after seeding (the gains below):
the text tokens' keys and values in the joint attention, the pooled text and guidance embedders. With them
every input (prompt, prompt_2, prompt_3, guidance, true_cfg_scale) visibly moves a 16x16 image
(tests/integration/test_dit_families.py checks that it does).
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

from model_store.demo import _CORPUS, _build_tokenizer, clip_text_config, finish_pipeline

_TRANSFORMER_SEED, _VAE_SEED, _CLIP_SEED, _CLIP_2_SEED, _T5_SEED = 20, 21, 22, 23, 24
T5_SHAPE: dict[str, Any] = {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 5}
T5_VOCAB_SIZE = 1103
# Conditioning gains. The text stream is layer-normed before joint attention, so scaling the context embedder
# changes nothing; what does is the text tokens' keys and values in the joint attention (SD3's new T5 prompt: 0.7
# mean levels at x1, 25 at x3) and the embedders of pooled text and guidance (a modulation of every block).
# FLUX's T5 prompt (prompt_2) stays the faintest input: 1.4 mean levels, 7 at most, on a 16x16 image.
_JOINT_ATTENTION_GAIN = 3.0  # add_k_proj and add_v_proj of the joint (double-stream) blocks
_POOLED_GAIN = 6.0  # the pooled CLIP text embedder
_GUIDANCE_GAIN = 6.0  # FLUX's guidance embedder
_TAIL_GAIN = 8.0  # the output projections after the first block, where a feature cache must show


def build_t5_tokenizer() -> Any:
    """A T5-style Unigram tokenizer (pad 0, eos 1, unk 2) over the demo corpus's words and characters, through
    `from_pretrained` as a checkpoint's would load."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # at run time: the fast tokenizer

    words = sorted(set(re.findall(r"[a-z]+", _CORPUS.lower())))
    chars = sorted(set(_CORPUS.lower()) - {" ", "\n"})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0 - 0.01 * len(word)) for word in words]
    pieces += [(char, -8.0) for char in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    wrapped = T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    with tempfile.TemporaryDirectory(prefix="tiny-t5-tokenizer-") as tmp:
        wrapped.save_pretrained(tmp)
        return T5TokenizerFast.from_pretrained(tmp)


def _t5(seed: int) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(**T5_SHAPE, relative_attention_num_buckets=8, vocab_size=T5_VOCAB_SIZE)
    return T5EncoderModel(config)


def _clip(tokenizer: Any, seed: int, projection: bool) -> Any:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    shape = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "hidden_act": "gelu",
        "projection_dim": 32,
    }
    config = clip_text_config(tokenizer, **shape)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(seed: int, latent_channels: int, blocks: int = 1) -> Any:
    """diffusers' test VAE: one block (no downsampling), or `blocks` of them (8x for 4)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(4,) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _scale(module: Any, gain: float) -> None:
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(gain)


def _amplify_joint_attention(transformer: Any) -> None:
    for block in transformer.transformer_blocks:
        _scale(block.attn.add_k_proj, _JOINT_ATTENTION_GAIN)
        _scale(block.attn.add_v_proj, _JOINT_ATTENTION_GAIN)


def build_tiny_flux(
    seed: int = 0, guidance_embeds: bool = True, torch_dtype: Any = None, cache_visible: bool = False
) -> Any:
    """FLUX.1 [dev] shaped (`guidance_embeds=True`: distilled guidance) or [schnell] shaped (False).

    `cache_visible`: three blocks (one double, two single), and every block's output projections but the
    first's, and the final `proj_out`, times `_TAIL_GAIN`. With random weights the blocks after the first change
    the image too little for a First Block Cache to show (FACTS.md: reuse changes it by at most 1 level);
    scaled, reuse moves it by tens of levels, and some thresholds give both hits and misses."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _TRANSFORMER_SEED)
        transformer: Any = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=2 if cache_visible else 1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        )
        _amplify_joint_attention(transformer)
        if cache_visible:
            for block in transformer.single_transformer_blocks:
                _scale(block.proj_out, _TAIL_GAIN)
            _scale(transformer.proj_out, _TAIL_GAIN)
        _scale(transformer.time_text_embed.text_embedder, _POOLED_GAIN)
        if guidance_embeds:
            _scale(transformer.time_text_embed.guidance_embedder, _GUIDANCE_GAIN)
        tokenizer = _build_tokenizer()
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(seed + _VAE_SEED, latent_channels=1),
            text_encoder=_clip(tokenizer, seed + _CLIP_SEED, projection=False),
            tokenizer=tokenizer,
            text_encoder_2=_t5(seed + _T5_SEED),
            tokenizer_2=build_t5_tokenizer(),
            transformer=transformer,
        )
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_flux_kontext(seed: int = 0, torch_dtype: Any = None) -> Any:
    """FLUX.1 Kontext [dev]: FLUX's transformer and encoders, with a 16x VAE. Kontext renders at about 1 MP
    (`max_area`) and resizes the reference to a preferred ~1 MP size whatever the request's size, so the test
    recipe's 1x VAE would make 262144 image tokens; 16x makes 1024 for each (a real 8x checkpoint, 4096)."""
    import torch
    from diffusers import FluxKontextPipeline

    flux = build_tiny_flux(seed=seed)
    with torch.random.fork_rng(devices=[]):
        vae = _vae(seed + _VAE_SEED, latent_channels=1, blocks=5)
    pipe = FluxKontextPipeline(**{**flux.components, "vae": vae})
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_sd3(seed: int = 0, torch_dtype: Any = None) -> Any:
    """Stable Diffusion 3 shaped: two CLIP encoders with projections and a T5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _TRANSFORMER_SEED)
        transformer: Any = SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        _amplify_joint_attention(transformer)
        _scale(transformer.time_text_embed.text_embedder, _POOLED_GAIN)
        tokenizer = _build_tokenizer()
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(seed + _VAE_SEED, latent_channels=4),
            text_encoder=_clip(tokenizer, seed + _CLIP_SEED, projection=True),
            tokenizer=tokenizer,
            text_encoder_2=_clip(tokenizer, seed + _CLIP_2_SEED, projection=True),
            tokenizer_2=_build_tokenizer(),
            text_encoder_3=_t5(seed + _T5_SEED),
            tokenizer_3=build_t5_tokenizer(),
            transformer=transformer,
        )
    return finish_pipeline(pipe, torch_dtype)


_DIT_SEED, _PIXART_SEED = 25, 26


def build_tiny_dit(seed: int = 0, torch_dtype: Any = None) -> Any:
    """A class-conditional DiT (ImageNet-style labels, no text), as diffusers' DiT test builds it."""
    import torch
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _DIT_SEED)
        transformer = DiTTransformer2DModel(
            sample_size=16,
            num_layers=2,
            patch_size=4,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
        )
        vae = _vae(seed + _VAE_SEED, latent_channels=4)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_pixart_sigma(seed: int = 0, torch_dtype: Any = None) -> Any:
    """PixArt-Sigma as diffusers' test builds it: a sample size of 8, which its resolution binning (on by
    default) refuses ("Invalid sample size"): the direct call works only with `use_resolution_binning=False`."""
    import torch
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _PIXART_SEED)
        transformer = PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        vae = _vae(seed + _VAE_SEED, latent_channels=4)
        pipe = PixArtSigmaPipeline(
            transformer=transformer,
            vae=vae,
            scheduler=DDIMScheduler(),
            text_encoder=_t5(seed + _T5_SEED),
            tokenizer=build_t5_tokenizer(),
        )
    return finish_pipeline(pipe, torch_dtype)


_LUMINA_SEED, _GEMMA_SEED = 27, 28


def build_gemma_tokenizer() -> Any:
    """A Gemma-style tokenizer (pad 0, eos 1, bos 2, unk 3) over the demo corpus, as `GemmaTokenizerFast`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizerFast  # type: ignore[attr-defined]  # at run time: the fast tokenizer

    words = sorted(set(re.findall(r"[a-z]+", _CORPUS.lower())))
    chars = sorted(set(_CORPUS.lower()) - {" ", "\n"})
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *(f"\u2581{w}" for w in words), *chars]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    wrapped = GemmaTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    with tempfile.TemporaryDirectory(prefix="tiny-gemma-tokenizer-") as tmp:
        wrapped.save_pretrained(tmp)
        return GemmaTokenizerFast.from_pretrained(tmp)


def build_tiny_lumina2(seed: int = 0, torch_dtype: Any = None) -> Any:
    """Lumina-Image 2.0 as diffusers' test builds it: a sample size of 4 and a VAE that does not downsample,
    while the pipeline assumes 8x: its own default is a 32 px request that decodes to 4x4 pixels."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _LUMINA_SEED)
        transformer = Lumina2Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            hidden_size=8,
            num_layers=2,
            num_attention_heads=1,
            num_kv_heads=1,
            multiple_of=16,
            ffn_dim_multiplier=None,
            norm_eps=1e-5,
            scaling_factor=1.0,
            axes_dim_rope=(4, 2, 2),
            cap_feat_dim=8,
        )
        vae = _vae(seed + _VAE_SEED, latent_channels=4)
        tokenizer = build_gemma_tokenizer()
        torch.manual_seed(seed + _GEMMA_SEED)
        config = Gemma2Config(
            head_dim=4,
            hidden_size=8,
            intermediate_size=8,
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=2,
            sliding_window=2,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        pipe = Lumina2Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=Gemma2Model(config),
            tokenizer=tokenizer,
        )
    return finish_pipeline(pipe, torch_dtype)
