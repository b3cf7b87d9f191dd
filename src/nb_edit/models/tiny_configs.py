"""Tiny configurations of every model class, sized for 2 CPU cores.

Each function returns a fresh plain dict that the diffusers / transformers class takes as its
config (``UNet2DConditionModel.from_config(d)``, ``CLIPTextConfig(**d)``), so a notebook can
override any field before building. Sizes follow the measurements in the project's CPU budget
notes: token count dominates the transformer's cost, so the DiT patchifies 32 px pixels with
patch 4 (64 target tokens, 128 with the reference tokens); the UNet uses three small levels
(16, 32, 32) and is the tiny profile's default backbone.

Shared dimensions: the tiny text encoder's hidden size is both the UNet's ``cross_attention_dim``
and the DiT's ``joint_attention_dim``/``pooled_projection_dim`` (a CLIP pooled output has the
hidden size), so one text encoder serves both backbones.
"""

from __future__ import annotations

TINY_TEXT_DIM = 32
# tokens per text, [BOS] and [EOS] included: the longest text an editor reads is Multi-Reward's
# joined failure texts (three clauses, up to 25 tokens in the rich world)
TINY_MAX_TEXT_LENGTH = 32
TINY_PIXEL_CHANNELS = 3
TINY_DIT_PATCH = 4


def tiny_clip_text_config(vocab_size: int, eos_token_id: int, pad_token_id: int, bos_token_id: int,
                          **overrides) -> dict:
    """``CLIPTextConfig`` fields for a 2-layer, 32-wide text encoder over a word-level vocabulary.

    ``eos_token_id`` must be the tokenizer's real end token: CLIP pools the hidden state at the
    first end token (the legacy argmax rule applies only when it equals 2, so the tokenizer of
    :mod:`nb_edit.models.text` never gives [EOS] the id 2).
    """
    config = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=2 * TINY_TEXT_DIM,
        projection_dim=TINY_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_TEXT_LENGTH,
        hidden_act="gelu",
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    config.update(overrides)
    return config


def tiny_unet_config(latent_channels: int = TINY_PIXEL_CHANNELS, with_reference: bool = True,
                     **overrides) -> dict:
    """``UNet2DConditionModel`` fields: blocks (16, 32, 32), cross-attention on the two lower levels.

    ``with_reference`` doubles ``in_channels`` for InstructPix2Pix-style channel concatenation
    (editor); without it the UNet is a text-to-image teacher. 0.43 M parameters; trained from
    scratch on ShapesWorld pairs for 10 minutes on one CPU thread (batch 32), it edited better
    than the DiT of :func:`tiny_flux_config` given the same time (oracle success 0.073 against
    0.016, preserved 0.27 against 0.14): the reference sits on the same pixel as the output, so
    copying what must be preserved is local work for a convolution.
    """
    config = dict(
        sample_size=32,
        in_channels=2 * latent_channels if with_reference else latent_channels,
        out_channels=latent_channels,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=2,  # diffusers reads this as the number of heads (2 x 16 at 32 ch)
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_flux_config(latent_channels: int = TINY_PIXEL_CHANNELS, patch: int = TINY_DIT_PATCH,
                     **overrides) -> dict:
    """``FluxTransformer2DModel`` fields: 3 double + 3 single blocks, 2 heads x 32, 0.7 M params.

    As in the FLUX.1 hub configs, ``patch_size`` stays 1 and the editor packs ``patch x patch``
    latent pixels into each token itself, so ``in_channels = latent_channels * patch**2``.
    The rotary axes (8, 12, 12) split the head dimension 32 over (image index, row, column).
    FLUX's rotary base is 10000, so an axis of ``d`` dimensions turns at the frequencies
    ``10000^(-2i/d)``: with 6 dimensions per axis (4 heads x 16) only the first one (1 rad per
    token) varies over an 8-token grid, and rows 0 and 6 are almost the same angle (6 rad ~ 2 pi);
    the model then cannot tell where a token is, its samples come out scrambled and an editor
    cannot copy its reference. 12 dimensions add 0.22 rad per token, which tells all 8 apart.
    """
    config = dict(
        patch_size=1,
        in_channels=latent_channels * patch * patch,
        num_layers=3,
        num_single_layers=3,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_DIM,
        pooled_projection_dim=TINY_TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    config.update(overrides)
    return config


def tiny_vae_config(latent_channels: int = 4, **overrides) -> dict:
    """``AutoencoderKL`` fields: 2 levels (downsample 2), 4 latent channels, for tests and demos."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    config.update(overrides)
    return config
