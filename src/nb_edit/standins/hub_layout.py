"""Random models in the hub layout of the real classes: what the full profile loads by hub id,
written with ``save_pretrained`` so that the loaders read them by path. Nothing downloads.

Two sizes of the same folders:

- ``tiny``: a CPU runs the full profile's code path on them in seconds (the tests);
- ``real``: the architectures of the hub models with random weights, for the GPU check
  (``nb_edit.bench.run_gpu_trainer_check``): cost and memory do not depend on the weights.

Folders:

- :func:`flux_kontext`: a ``FluxKontextPipeline`` (transformer/, vae/ with FLUX's 16 latent
  channels, text_encoder/ CLIP, text_encoder_2/ T5, tokenizers, a flow-matching scheduler), the
  layout of FLUX.1-Kontext-dev; real size: its 12B transformer, its VAE, CLIP-L and a T5-XXL
  encoder;
- :func:`instruct_pix2pix`: a ``StableDiffusionInstructPix2PixPipeline`` (unet/ with twice the
  latent channels as input, vae/, CLIP, an epsilon-prediction scheduler), the layout of
  timbrooks/instruct-pix2pix; real size: SD 1.5's UNet, VAE and CLIP-L;
- :func:`qwen_judge`: a ``Qwen2_5_VLForConditionalGeneration`` with tokenizer and image processor;
  real size: Qwen2.5-VL-7B-Instruct.

Every text model uses the world's word-level tokenizer (its vocabulary sizes the tiny models'
embeddings; the real ones keep their hub vocabulary sizes). The tiny VAEs halve the image side
(the real ones divide it by 8); FLUX packs 2 x 2 latents per token as its pipeline does.
"""

from __future__ import annotations

from contextlib import contextmanager
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
from transformers import CLIPTextConfig, CLIPTextModel, Qwen2VLImageProcessorPil, T5Config, T5EncoderModel

from nb_edit import world
from nb_edit.models.tiny_configs import (
    TINY_TEXT_DIM,
    tiny_clip_text_config,
    tiny_flux_config,
    tiny_unet_config,
    tiny_vae_config,
)
from nb_edit.models.vlm.judge import QWEN_VISION_TOKENS, VLMJudge
from nb_edit.standins.editors import world_tokenizer
from nb_edit.standins.judge import judge_tokenizer

SIZES = ("tiny", "real")
FLUX_LATENT_CHANNELS = 16  # FLUX.1's autoencoder
SD_LATENT_CHANNELS = 4  # Stable Diffusion's (InstructPix2Pix)

# FLUX.1-Kontext-dev's transformer/config.json, written out (random weights need no download)
KONTEXT_DIT_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# FLUX.1's and SD 1.5's autoencoders: 4 levels (downsample 8)
_VAE_LEVELS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2)
FLUX_VAE_CONFIG = dict(**_VAE_LEVELS, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
SD_VAE_CONFIG = dict(**_VAE_LEVELS, latent_channels=4, scaling_factor=0.18215, sample_size=512)
# SD 1.5's UNet with InstructPix2Pix's 8 input channels (diffusers' defaults are SD 1.5's blocks)
IP2P_UNET_CONFIG = dict(in_channels=8, out_channels=4, cross_attention_dim=768, sample_size=64)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768)
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
T5_TINY = dict(d_model=TINY_TEXT_DIM, d_ff=64, d_kv=8, num_layers=1, num_heads=4)
QWEN25_VL_7B = dict(
    vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
    text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                 "bos_token_id": None, "eos_token_id": None},
)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is unknown; use one of {', '.join(SIZES)}.")


@contextmanager
def _building(size: str, seed: int):
    """Seeded; real-sized models are made in bf16 on the GPU when there is one (minutes faster
    than initialising 12B parameters on the CPU), tiny ones in fp32 where they are."""
    _check_size(size)
    torch.manual_seed(seed)
    if size == "tiny":
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def _text_encoders(tokenizer, size: str, with_t5: bool):
    clip = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(
        tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
        **(CLIP_L_TEXT if size == "real" else {}))))
    if not with_t5:
        return clip, None
    sizes = T5_XXL_ENCODER if size == "real" else {**T5_TINY, "vocab_size": tokenizer.vocab_size}
    t5 = T5EncoderModel(T5Config(**sizes, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    return clip, t5


def flux_kontext(folder: str | Path, size: str = "tiny", tokenizer=None, latent_channels: int = FLUX_LATENT_CHANNELS,
                 seed: int = 0) -> Path:
    """A FluxKontextPipeline of random weights written to ``folder``. ``latent_channels`` applies
    to the tiny size (the real one is FLUX's 16)."""
    tokenizer = tokenizer or world_tokenizer(world.WorldConfig())
    with _building(size, seed):
        clip, t5 = _text_encoders(tokenizer, size, with_t5=True)
        if size == "real":
            vae, transformer = AutoencoderKL(**FLUX_VAE_CONFIG), FluxTransformer2DModel(**KONTEXT_DIT_CONFIG)
        else:
            vae = AutoencoderKL(**tiny_vae_config(latent_channels))
            transformer = FluxTransformer2DModel(**tiny_flux_config(latent_channels, patch=2))
        pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                                   tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def instruct_pix2pix(folder: str | Path, size: str = "tiny", tokenizer=None, latent_channels: int = SD_LATENT_CHANNELS,
                     seed: int = 0) -> Path:
    """A StableDiffusionInstructPix2PixPipeline of random weights written to ``folder`` (a UNet
    with 2 x latent_channels inputs, epsilon prediction on SD's DDPM schedule)."""
    tokenizer = tokenizer or world_tokenizer(world.WorldConfig())
    with _building(size, seed):
        clip, _ = _text_encoders(tokenizer, size, with_t5=False)
        if size == "real":
            vae, unet = AutoencoderKL(**SD_VAE_CONFIG), UNet2DConditionModel(**IP2P_UNET_CONFIG)
            scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        else:
            vae = AutoencoderKL(**tiny_vae_config(latent_channels))
            unet, scheduler = UNet2DConditionModel(**tiny_unet_config(latent_channels)), EulerDiscreteScheduler()
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def qwen_judge(folder: str | Path, size: str = "tiny", image_size: int = 32, seed: int = 0) -> Path:
    """A Qwen2.5-VL judge of random weights (model, tokenizer, image processor) written to
    ``folder``; ``image_size`` is the largest image side its processor keeps unresized."""
    tokenizer = judge_tokenizer(world.WorldConfig())
    if size == "tiny":
        _check_size(size)
        judge = VLMJudge.tiny("qwen2_5_vl", tokenizer, image_size=image_size, seed=seed)
        judge.save_pretrained(folder)
        return Path(folder)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer.add_special_tokens({"extra_special_tokens": list(QWEN_VISION_TOKENS)},
                                 replace_extra_special_tokens=False)
    start, pad, end, video = tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    config = Qwen2_5_VLConfig(**QWEN25_VL_7B, image_token_id=pad, video_token_id=video,
                              vision_start_token_id=start, vision_end_token_id=end)
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    processor = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                         temporal_patch_size=vision.temporal_patch_size, min_pixels=factor * factor,
                                         max_pixels=image_size * image_size)
    with _building(size, seed):
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    VLMJudge(model, tokenizer, processor).save_pretrained(folder)
    return Path(folder)


EDITOR_FAMILIES = {"flux_kontext": flux_kontext, "instruct_pix2pix": instruct_pix2pix}
