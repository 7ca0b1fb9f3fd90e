"""Tiny random-weight Qwen-Image and Z-Image pipelines, built offline like the demo model, for tests and the bench.

Shapes follow diffusers' own tests (`get_dummy_components()` of tests/pipelines/qwenimage and z_image): two-layer
transformers, Qwen2.5-VL and Qwen3 text encoders of 16 hidden units. The hub's Qwen2 tokenizer is replaced by a
byte-level BPE this module learns from the demo corpus (`build_qwen_tokenizer`), with Qwen's special tokens and a
Qwen3-style chat template, wrapped as `Qwen2TokenizerFast`. The vocabulary is the tokenizer's own size, not the
hub model's 152k, so the encoders stay small.

Random weights leave Qwen-Image's prompt nearly inert, so its builder scales the text tokens' values and keys in
the joint attention after seeding (Z-Image's prompt moves the image unscaled); tests/integration/
test_dit_families.py checks that every input moves the image.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

from model_store.demo import _CORPUS, finish_pipeline

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3's template as the Z-Image pipeline calls it (`enable_thinking=True`, a generation prompt).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_QWEN_VOCAB_SIZE = 640
_QWEN_IMAGE_SEED, _QWEN_VAE_SEED, _QWEN_TEXT_SEED = 30, 31, 32
_Z_IMAGE_SEED, _Z_VAE_SEED, _Z_TEXT_SEED = 33, 34, 35
# The text tokens' values and (RMS-normed) keys in Qwen-Image's joint attention: with them a new prompt moves a
# 32x32 image by 13 levels at most (2 in the mean), against 0.7 unscaled.
_TEXT_VALUE_GAIN = 16.0
_TEXT_KEY_NORM_GAIN = 4.0


def build_qwen_tokenizer() -> Any:
    """A Qwen2-style byte-level BPE (pad `<|endoftext|>`, eos `<|im_end|>`, right padding) learned from the demo
    corpus, through `from_pretrained` as a checkpoint's would load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]  # at run time: the fast tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_QWEN_VOCAB_SIZE,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(re.split(r"\n+", _CORPUS.strip()), trainer)
    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        padding_side="right",
        chat_template=_CHAT_TEMPLATE,
    )
    with tempfile.TemporaryDirectory(prefix="tiny-qwen-tokenizer-") as tmp:
        wrapped.save_pretrained(tmp)
        return Qwen2TokenizerFast.from_pretrained(tmp)


def _scale(module: Any, gain: float) -> None:
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(gain)


def _qwen_vl(tokenizer: Any, seed: int) -> Any:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(seed: int = 0, torch_dtype: Any = None) -> Any:
    """Qwen-Image as diffusers' test builds it: a 4x VAE, so the pipeline's own default size is 128 x 4 = 512 px."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _QWEN_IMAGE_SEED)
        transformer: Any = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
        for block in transformer.transformer_blocks:
            _scale(block.attn.add_v_proj, _TEXT_VALUE_GAIN)
            _scale(block.attn.norm_added_k, _TEXT_KEY_NORM_GAIN)
        torch.manual_seed(seed + _QWEN_VAE_SEED)
        vae = AutoencoderKLQwenImage(
            base_dim=24,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
        tokenizer = build_qwen_tokenizer()
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=_qwen_vl(tokenizer, seed + _QWEN_TEXT_SEED),
            tokenizer=tokenizer,
            transformer=transformer,
        )
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_z_image(seed: int = 0, torch_dtype: Any = None) -> Any:
    """Z-Image as diffusers' test builds it, but for an 8x VAE of 8 channels (the test's is 2x): the pipeline's
    own default size is 1024 px whatever the VAE, so a warm-up or a sizeless request makes 4096 image tokens,
    as real checkpoints do, not 65536."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _Z_IMAGE_SEED)
        transformer: Any = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=16,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[256, 64, 64],  # the test has 32: 64 patches a side make the 1024 px default possible
        )
        with torch.no_grad():  # `torch.empty` in the model: fixed as diffusers' test fixes them
            transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
            transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
        torch.manual_seed(seed + _Z_VAE_SEED)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 8, 8],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
        tokenizer = build_qwen_tokenizer()
        torch.manual_seed(seed + _Z_TEXT_SEED)
        config = Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        pipe = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=Qwen3Model(config),
            tokenizer=tokenizer,
            transformer=transformer,
        )
    return finish_pipeline(pipe, torch_dtype)
