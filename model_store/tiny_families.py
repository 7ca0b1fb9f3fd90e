"""Tiny random-weight pipelines of other diffusers families, plus a tiny LoRA and textual-inversion embedding.

`model_store.demo` builds the tiny Stable Diffusion pipeline; tests and benchmarks of the other families the
service serves (SDXL, ControlNet, inpainting, unconditional DDPM) and of the adapters it loads (LoRA, textual
inversion) need the same kind of fixture: the real pipeline classes, call paths and save/load layouts, built
offline, deterministically from a seed, in well under a second per call.

Random initialisation alone leaves conditioning nearly inert (a different control image moved the output by
0.00 uint8 levels, a different prompt by 2-4, a different masked image by 1.5), so a test could not tell a
dropped input from a used one. The builders therefore strengthen the conditioning paths deterministically
after seeding (`_amplify_conditioning`, `_randomize_controlnet_zero_convs`, `_sharpen_vae_posterior`) so that
every input moves a 4-step 64x64 image by about 5 mean levels or more, while images stay far from flat,
saturated colours (pixel std ~45 levels, about 2% of pixels at 0 or 255).

Heavy libraries (torch, diffusers, transformers, peft) are imported inside the functions so importing this
module stays cheap.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.demo import _build_tokenizer, build_tiny_pipeline, clip_text_config, finish_pipeline, sd_pipeline

if TYPE_CHECKING:
    import torch
    from diffusers import (
        ControlNetModel,
        DDPMPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

# Seed offsets, one per module, continuing demo.py's (UNet 0, VAE 1, text encoder 2): each module's weights depend
# only on (seed, module), not on build order or on what else consumed random numbers before.
_SDXL_UNET_SEED = 3
_TEXT_ENCODER_2_SEED = 4
_CONTROLNET_SEED = 5
_INPAINT_UNET_SEED = 6
_DDPM_UNET_SEED = 7
_LORA_SEED = 8
_EMBEDDING_SEED = 9

# Conditioning gains, measured on these tiny models: with them each input moves a 4-step 64x64 image by about
# 5 mean uint8 levels or more, without them by 0-4.
_CROSS_ATTENTION_GAIN = 3.0  # attn2.to_v and attn2.to_out.0 each: the text's path into the UNet.
_ADD_EMBEDDING_GAIN = 9.0  # SDXL add_embedding.linear_1: pooled text + size/crop conditioning.
# ControlNet conditioning embedding's conv_out, after He init. SDXL needs less: at 10 the control residuals
# swamp its prompt (prompt change 1.7 levels); at 3 both move the image by 5-16 levels across seeds 0 and 1.
_SD_CONTROL_EMBEDDING_GAIN = 10.0
_SDXL_CONTROL_EMBEDDING_GAIN = 3.0

# VAE encoder posterior (quant_conv): random weights give latent means of std 0.03 (after scaling_factor) under
# a posterior std of 1, so encoded images (img2img, inpainting's masked image) were noise: a different masked
# image moved the output by 1.5 levels. x30 on the mean and a tiny fixed std give SD-like latents of std ~1.
_VAE_MEAN_GAIN = 30.0
_VAE_LOGVAR = -10.0

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
SDXL_PROJECTION_DIM = 32
SDXL_ADDITION_TIME_EMBED_DIM = 8
_SDXL_TIME_IDS = 6  # original_size (2) + crops_coords_top_left (2) + target_size (2).


def _demo_unet_kwargs() -> dict[str, Any]:
    """The demo UNet's shape (model_store.demo.build_tiny_pipeline), for variants that must match it."""
    return {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 8,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def _sd_scheduler_kwargs() -> dict[str, Any]:
    """Stable Diffusion's training betas and step layout, as in demo.py's DDIM scheduler."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }


def _amplify_conditioning(unet: Any) -> None:
    """Scale the UNet's conditioning paths in place so prompts and SDXL's micro-conditioning visibly matter.

    Cross-attention value/output projections carry the text into the image; SDXL's add_embedding carries the
    pooled text and the size/crop ids. Plain multiplication: deterministic and consumes no random numbers.
    """
    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):  # Cross-attention; attn1 is self-attention.
                module.to_v.weight.mul_(_CROSS_ATTENTION_GAIN)
                module.to_out[0].weight.mul_(_CROSS_ATTENTION_GAIN)
        add_embedding = getattr(unet, "add_embedding", None)
        if add_embedding is not None:
            add_embedding.linear_1.weight.mul_(_ADD_EMBEDDING_GAIN)


def _sharpen_vae_posterior(vae: Any) -> None:
    """Make encoded images carry their content, as a trained VAE's do: larger means, near-zero posterior std.

    Only the encoder side (quant_conv) changes, so text-to-image output is unaffected; img2img and inpainting
    then see the input image instead of sampling noise. Deterministic, consumes no random numbers.
    """
    import torch

    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        quant_conv = vae.quant_conv  # Outputs [mean (latent_channels), logvar (latent_channels)].
        quant_conv.weight[:latent_channels].mul_(_VAE_MEAN_GAIN)
        quant_conv.bias[:latent_channels].mul_(_VAE_MEAN_GAIN)
        quant_conv.weight[latent_channels:].zero_()
        quant_conv.bias[latent_channels:].fill_(_VAE_LOGVAR)


def _randomize_controlnet_zero_convs(controlnet: Any, embedding_gain: float) -> None:
    """Make the control image matter: random zero-convs, and a conditioning embedding that passes its input.

    A freshly initialised ControlNet outputs zero residuals by design (its training starts from there), so the
    control image is exactly inert. Random zero-convs alone are not enough: through the conditioning
    embedding's eight default-initialised convolutions and SiLUs the image's signal shrinks to about 1e-4 of
    the constant bias, so every control image gives the same residuals. He-initialised weights with zero biases
    and a gain on conv_out bring the embedding to the scale of the latents it is added to. Call under a seeded
    RNG.
    """
    import torch

    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.reset_parameters()  # PyTorch's default (Kaiming-uniform) init.
        embedding = controlnet.controlnet_cond_embedding
        for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
        embedding.conv_out.weight.mul_(embedding_gain)


def _sdxl_components(seed: int) -> dict[str, Any]:
    """SDXL's components: the demo's f8 VAE and CLIP text encoder (SDXL's first encoder is SD's CLIP-L too),
    a second CLIP text encoder with a projection, and a text_time UNet whose shapes match both encoders."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    base: Any = build_tiny_pipeline(seed)
    tokenizer_2 = _build_tokenizer()
    text_encoder_hidden = base.text_encoder.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _TEXT_ENCODER_2_SEED)
        text_config_2 = clip_text_config(
            tokenizer_2,
            hidden_size=32,
            projection_dim=SDXL_PROJECTION_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        )
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
        torch.manual_seed(seed + _SDXL_UNET_SEED)
        unet = UNet2DConditionModel(
            **{
                **_demo_unet_kwargs(),
                "in_channels": 4,
                # SDXL concatenates both encoders' penultimate hidden states along the feature axis.
                "cross_attention_dim": text_encoder_hidden + text_config_2.hidden_size,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": SDXL_ADDITION_TIME_EMBED_DIM,
                # Sinusoidal embeddings of the 6 size/crop ids, then text_encoder_2's pooled projection.
                "projection_class_embeddings_input_dim": _SDXL_TIME_IDS * SDXL_ADDITION_TIME_EMBED_DIM
                + SDXL_PROJECTION_DIM,
            }
        )
    _amplify_conditioning(unet)
    _sharpen_vae_posterior(base.vae)
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler config.
        **_sd_scheduler_kwargs(),
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    return {
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": base.tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": scheduler,
    }


def build_tiny_sd(seed: int = 0, torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """The demo SD pipeline with its conditioning amplified, for tests that must see the prompt's effect.

    model_store.demo.build_tiny_pipeline is left as it is (saved fixtures depend on its exact weights); a
    prompt change moves its images by only 2-4 levels, 12 here. The VAE encoder is sharpened too, so img2img
    (e.g. via from_pipe) sees its input image.
    """
    pipe: Any = build_tiny_pipeline(seed)  # Any: mypy sees no registered components.
    _amplify_conditioning(pipe.unet)
    _sharpen_vae_posterior(pipe.vae)
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_sdxl(seed: int = 0, torch_dtype: torch.dtype | None = None) -> StableDiffusionXLPipeline:
    """A tiny SDXL text-to-image pipeline (64x64 native, two text encoders, size/crop conditioning).

    Random weights, offline, identical for the same seed; the caller's global torch RNG is left untouched.
    """
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    components = _sdxl_components(seed)
    # add_watermarker=False: the default enables it whenever invisible-watermark happens to be installed.
    pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return finish_pipeline(pipe, torch_dtype)


def _build_controlnet(unet: UNet2DConditionModel, seed: int, embedding_gain: float) -> ControlNetModel:
    """A ControlNet initialised from the UNet (as ControlNet training starts), with random zero-convs."""
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _CONTROLNET_SEED)
        # Four entries: three stride-2 stages take the 64x64 control image down to the 8x8 latent (f8).
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
        _randomize_controlnet_zero_convs(controlnet, embedding_gain)
    return controlnet


def build_tiny_sd_controlnet(
    seed: int = 0, torch_dtype: torch.dtype | None = None
) -> StableDiffusionControlNetPipeline:
    """The demo SD pipeline (conditioning amplified) plus a matching ControlNet whose control image matters."""
    from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline

    base: Any = build_tiny_sd(seed)
    controlnet = _build_controlnet(base.unet, seed, _SD_CONTROL_EMBEDDING_GAIN)
    components: dict[str, Any] = {**base.components, "controlnet": controlnet}
    pipe = StableDiffusionControlNetPipeline(**components, requires_safety_checker=False)
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_sdxl_controlnet(
    seed: int = 0, torch_dtype: torch.dtype | None = None
) -> StableDiffusionXLControlNetPipeline:
    """The tiny SDXL pipeline plus a matching (text_time) ControlNet whose control image matters."""
    from diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl import StableDiffusionXLControlNetPipeline

    components = _sdxl_components(seed)
    components["controlnet"] = _build_controlnet(components["unet"], seed, _SDXL_CONTROL_EMBEDDING_GAIN)
    pipe = StableDiffusionXLControlNetPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return finish_pipeline(pipe, torch_dtype)


def build_tiny_sd_inpainting(seed: int = 0, torch_dtype: torch.dtype | None = None) -> StableDiffusionInpaintPipeline:
    """The demo SD pipeline with a true inpainting UNet: 9 input channels (latents 4 + mask 1 + masked image 4)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import StableDiffusionInpaintPipeline

    return _demo_with_unet(StableDiffusionInpaintPipeline, 9, seed, _INPAINT_UNET_SEED, torch_dtype)  # type: ignore[no-any-return]


def _demo_with_unet(pipeline_class: Any, in_channels: int, seed: int, unet_seed: int, torch_dtype: Any) -> Any:
    """The demo SD pipeline's parts around a UNet of its shape with more input channels (inpainting, editing),
    its conditioning amplified and the VAE's posterior sharpened as the other variants'."""
    import torch
    from diffusers import UNet2DConditionModel

    base: Any = build_tiny_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + unet_seed)
        unet = UNet2DConditionModel(**{**_demo_unet_kwargs(), "in_channels": in_channels})
    _amplify_conditioning(unet)
    _sharpen_vae_posterior(base.vae)
    components: dict[str, Any] = {**base.components, "unet": unet}
    return finish_pipeline(pipeline_class(**components, requires_safety_checker=False), torch_dtype)


def build_tiny_ddpm(seed: int = 0, torch_dtype: torch.dtype | None = None) -> DDPMPipeline:
    """A tiny unconditional pixel-space DDPM pipeline (32x32 RGB), for the non-latent, unconditional path."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _DDPM_UNET_SEED)
        unet = UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
        )
    # prediction_type="sample": with epsilon prediction a random UNet's x0 estimates are far out of range and
    # 40% of the pixels clip to 0 or 255; predicting the sample directly keeps images in range (0.7% clipped).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, prediction_type="sample"
    )
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    return finish_pipeline(pipe, torch_dtype)


def save_tiny_lora(
    pipeline: Any,
    directory: str | os.PathLike[str],
    seed: int = 0,
    rank: int = 4,
    scale_up: float = 1.0,
) -> Path:
    """Save a random LoRA for the attention projections of the pipeline's denoiser (its UNet, or the transformer of
    FLUX and SD3); return the .safetensors file's path.

    The file is what diffusers' own training scripts write (PEFT keys, `unet.` or `transformer.` prefix,
    safetensors), written by the pipeline class's `save_lora_weights`, and loads back with
    `pipeline.load_lora_weights(directory or file, adapter_name=...)`. lora_alpha equals the rank, so the scale
    is 1 whether or not a loader infers alpha.

    Each LoRA delta B @ A gets about `scale_up` times the standard deviation of the weight it modifies (PEFT's
    own init makes B zero, i.e. an inert LoRA), so weight 1.0 vs 0.0 visibly changes images. The adapter is
    added to a copy of the denoiser: the pipeline is left exactly as it was (no PEFT wrappers, no adapter config).
    """
    import torch
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    denoiser = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"  # FLUX, SD3: the latter
    if getattr(pipeline, denoiser, None) is None or not hasattr(pipeline, "save_lora_weights"):
        raise TypeError(f"{type(pipeline).__name__} has no denoiser LoRA support (save_lora_weights)")
    adapter_name = "tiny-random-lora"  # Never saved: the file's keys carry no adapter name.
    unet = copy.deepcopy(getattr(pipeline, denoiser))
    torch.nn.Module.to(unet, device="cpu", dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(LORA_TARGET_MODULES))
    unet.add_adapter(config, adapter_name=adapter_name)

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + _LORA_SEED)
        for _, module in sorted(unet.named_modules(), key=lambda item: item[0]):
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            lora_a: Any = module.lora_A[adapter_name].weight  # (rank, in_features)
            lora_b: Any = module.lora_B[adapter_name].weight  # (out_features, rank)
            base_weight: Any = module.get_base_layer().weight
            base_std = float(base_weight.std())
            # Var(B @ A) = rank * Var(A) * Var(B); Var(A) = 1 / in_features, so choose Var(B) for the target.
            lora_a.normal_(0.0, lora_a.shape[1] ** -0.5)
            lora_b.normal_(0.0, scale_up * base_std * (lora_a.shape[1] / rank) ** 0.5)

    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    layers = {f"{denoiser}_lora_layers": state_dict}
    type(pipeline).save_lora_weights(directory, **layers, safe_serialization=True)
    return Path(directory) / LORA_WEIGHT_NAME_SAFE


def save_tiny_embedding(
    pipeline: Any,
    path: str | os.PathLike[str],
    token: str = "<tiny-style>",
    seed: int = 0,
    num_vectors: int = 1,
    scale: float = 3.0,
) -> Path:
    """Save a random textual-inversion embedding for the pipeline's (first) text encoder; return its path.

    diffusers' format: a safetensors file with the single entry {token: (num_vectors, hidden_size)}, which
    `pipeline.load_textual_inversion(path, token=token)` accepts (several vectors load as token, token_1, ...).
    Each vector's norm is `scale` times the mean norm of the vocabulary's rows (3 moved images more than 1:
    7.4 vs 6.1 levels on average over the prompts and seeds measured). If path is a directory the file is
    `learned_embeds.safetensors` inside it, the name `load_textual_inversion(directory)` looks for. For SDXL
    this covers text_encoder only, as `load_textual_inversion` does by default.
    """
    import torch
    from safetensors.torch import save_file

    text_encoder = getattr(pipeline, "text_encoder", None)
    if text_encoder is None:
        raise TypeError(f"{type(pipeline).__name__} has no text encoder for a textual-inversion embedding")
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    hidden_size = table.shape[1]
    target_norm = float(table.norm(dim=1).mean())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _EMBEDDING_SEED)
        vectors = torch.randn(num_vectors, hidden_size)
    vectors = vectors / vectors.norm(dim=1, keepdim=True) * (target_norm * scale)

    out = Path(path)
    if out.is_dir():
        out = out / "learned_embeds.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: vectors.contiguous()}, str(out))
    return out


def build_sd15_shaped(seed: int = 0, torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.5-shaped pipeline with random weights (UNet 860 M parameters, CLIP-L-sized text encoder,
    the real VAE's shape): what `make bench --realistic` measures on a GPU, without downloading weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            clip_text_config(
                tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )
    scheduler = DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False)
    pipe = sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    return finish_pipeline(pipe, torch_dtype)  # type: ignore[no-any-return]


_PIX2PIX_UNET_SEED = 10


def build_tiny_instruct_pix2pix(seed: int = 0, torch_dtype: torch.dtype | None = None) -> Any:
    """The demo SD pipeline as an InstructPix2Pix editor: a UNet of 8 input channels (latents + the image's)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return _demo_with_unet(StableDiffusionInstructPix2PixPipeline, 8, seed, _PIX2PIX_UNET_SEED, torch_dtype)
