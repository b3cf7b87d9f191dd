"""Tiny random models in the hub layout of the real classes, written with ``save_pretrained``.

What a researcher loads by hub id in the full profile, at a size a CPU test runs in seconds:

- ``flux_kontext``: a ``FluxKontextPipeline`` (transformer/, vae/ with FLUX's 16 latent
  channels, text_encoder/ CLIP, text_encoder_2/ T5, tokenizers, a flow-matching scheduler);
- ``instruct_pix2pix``: a ``StableDiffusionInstructPix2PixPipeline`` (unet/ with 8 input
  channels, vae/ with 4 latent channels, CLIP, an epsilon-prediction scheduler);
- ``qwen_judge``: a ``Qwen2_5_VLForConditionalGeneration`` with its tokenizer and image processor.

The tiny VAEs halve the image side (FLUX.1's and SD's divide it by 8), so a 32-pixel image is a
16 x 16 latent; FLUX packs 2 x 2 latents per token as its pipeline does. The tokenizer is the
world's word-level one, so the instructions of ShapesWorld are read word by word. Nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from nb_edit import world
from nb_edit.models.tiny_configs import (
    TINY_TEXT_DIM,
    tiny_clip_text_config,
    tiny_flux_config,
    tiny_unet_config,
    tiny_vae_config,
)
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.standins.editors import world_tokenizer
from nb_edit.standins.judge import judge_tokenizer

FLUX_LATENT_CHANNELS = 16  # FLUX.1's autoencoder
SD_LATENT_CHANNELS = 4  # Stable Diffusion's (InstructPix2Pix)


def text_parts(tokenizer=None):
    """A word-level tokenizer and a tiny CLIP text encoder over its vocabulary."""
    tokenizer = tokenizer or world_tokenizer(world.WorldConfig())
    clip = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(
        tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)))
    return tokenizer, clip


def flux_kontext(folder: Path, tokenizer=None, latent_channels: int = FLUX_LATENT_CHANNELS, seed: int = 0) -> Path:
    """A tiny FluxKontextPipeline written to ``folder`` (the layout of FLUX.1-Kontext-dev)."""
    torch.manual_seed(seed)
    tokenizer, clip = text_parts(tokenizer)
    t5 = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=TINY_TEXT_DIM, d_ff=64, d_kv=8,
                                 num_layers=1, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id))
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKL(**tiny_vae_config(latent_channels)),
        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
        transformer=FluxTransformer2DModel(**tiny_flux_config(latent_channels, patch=2)))
    pipe.save_pretrained(folder)
    return Path(folder)


def instruct_pix2pix(folder: Path, tokenizer=None, latent_channels: int = SD_LATENT_CHANNELS, seed: int = 0) -> Path:
    """A tiny StableDiffusionInstructPix2PixPipeline written to ``folder`` (the layout of
    timbrooks/instruct-pix2pix: a UNet with 2 x latent_channels inputs, epsilon prediction)."""
    torch.manual_seed(seed)
    tokenizer, clip = text_parts(tokenizer)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL(**tiny_vae_config(latent_channels)), text_encoder=clip, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**tiny_unet_config(latent_channels)), scheduler=EulerDiscreteScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def qwen_judge(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL judge (model, tokenizer, image processor) written to ``folder``."""
    judge = VLMJudge.tiny("qwen2_5_vl", judge_tokenizer(world.WorldConfig()), image_size=image_size, seed=seed,
                          vision_layers=1, text_layers=1)
    judge.save_pretrained(folder)
    return Path(folder)


EDITOR_FAMILIES = {"flux_kontext": flux_kontext, "instruct_pix2pix": instruct_pix2pix}
