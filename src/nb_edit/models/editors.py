"""Editors: a flow-matching velocity model conditioned on text and, optionally, a reference image.

One interface for two diffusers backbones (NP-Edit sec. 3 "generator", MT-EditFlow's policy,
Multi-Reward's InstructPix2Pix editor)::

    editor(x_t [B, C, h, w], t [B] in [0, 1], text_states [B, L, D], pooled [B, P],
           source_latents [B, C, h', w'] | None) -> velocity [B, C, h, w]

with the project's convention ``x_t = (1 - t) x0 + t eps`` and ``v = eps - x0``.

- ``UNetEditor`` (InstructPix2Pix): the reference latents are concatenated to ``x_t`` on the
  channels (``in_channels = 2C``). A text-to-image teacher is the same class with
  ``in_channels = C``. The UNet's timestep is ``1000 t``.
- ``DiTEditor`` (FLUX.1-Kontext): latents are packed into ``patch x patch`` tokens; reference
  tokens are appended to the target tokens on the sequence and told apart by their position ids
  (first rotary coordinate 1 instead of 0); only the target tokens' outputs are read. The teacher
  is the same module called without ``source_latents``. FLUX takes ``timestep = t`` directly.

``editor_from_teacher`` starts an editor from a teacher (DiT: identical weights; UNet: ``conv_in``
widened with zero weights for the reference channels, as InstructPix2Pix does, so at
initialisation the UNet editor computes exactly what the teacher does).

``extra_time_embedding`` ([B, time_embedding_dim]) is added to the backbone's timestep embedding,
the hook Multi-Reward as Condition (sec. 3) uses to let every block see the reward condition.
``input_embedding_module()`` names the layer whose output is the first feature tokens (UNet
``conv_in``, DiT ``x_embedder``), where ``nb_edit.methods.multireward.condition`` hooks its reward cross-attention.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import nn

# The guidance value the FLUX.1 pipelines default to, for guidance-distilled transformers.
FLUX_DEFAULT_GUIDANCE = 3.5


class Editor(nn.Module):
    """Common checks and hooks; subclasses implement ``_velocity``."""

    backbone: nn.Module
    latent_channels: int
    takes_reference: bool

    @property
    def time_embedding_dim(self) -> int:
        return self._time_embedding_module().linear_2.out_features

    def _time_embedding_module(self) -> nn.Module:
        raise NotImplementedError

    def input_embedding_module(self) -> nn.Module:
        """The layer that turns the model input into feature tokens: UNet ``conv_in`` (output
        [B, C, h, w]), DiT ``x_embedder`` (output [B, N, D], target and reference tokens)."""
        raise NotImplementedError

    @property
    def input_feature_dim(self) -> int:
        """Channels of ``input_embedding_module()``'s output (C or D)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward: less memory for the unrolled NP-Edit step."""
        self.backbone.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.backbone.disable_gradient_checkpointing()

    @contextmanager
    def _added_to_time_embedding(self, extra: torch.Tensor | None):
        if extra is None:
            yield
            return
        if extra.ndim != 2 or extra.shape[1] != self.time_embedding_dim:
            raise ValueError(f"extra_time_embedding must be [B, {self.time_embedding_dim}]; got {tuple(extra.shape)}.")
        handle = self._time_embedding_module().register_forward_hook(lambda _m, _i, out: out + extra.to(out.dtype))
        try:
            yield
        finally:
            handle.remove()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor, pooled: torch.Tensor,
                source_latents: torch.Tensor | None = None,
                extra_time_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"x_t must be [B, {self.latent_channels}, h, w]; got {tuple(x_t.shape)}.")
        batch = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or [B={batch}]; got shape {tuple(t.shape)}.")
        if bool((t < 0).any() or (t > 1).any()):
            raise ValueError("t must lie in [0, 1] (t = 1 is pure noise); rescale timesteps from 0..1000 by 1/1000.")
        if text_states.ndim != 3 or text_states.shape[0] != batch or pooled.shape[0] != batch:
            raise ValueError(f"text_states must be [B={batch}, L, D] and pooled [B={batch}, P]; got "
                             f"{tuple(text_states.shape)} and {tuple(pooled.shape)} (TextEncoder.encode gives both).")
        if source_latents is not None:
            if not self.takes_reference:
                raise ValueError("this model has no reference input (a teacher); call it with source_latents=None "
                                 "or build an editor with editor_from_teacher().")
            if source_latents.shape[:2] != x_t.shape[:2]:
                raise ValueError(f"source_latents must be [B={batch}, {self.latent_channels}, ...]; "
                                 f"got {tuple(source_latents.shape)}. Encode the source with the same autoencoder.")
        with self._added_to_time_embedding(extra_time_embedding):
            return self._velocity(x_t, t, text_states, pooled, source_latents)

    def _velocity(self, x_t, t, text_states, pooled, source_latents):
        raise NotImplementedError


class UNetEditor(Editor):
    """``UNet2DConditionModel`` with channel-concatenated reference latents (InstructPix2Pix).

    With ``in_channels = 2C`` and ``source_latents=None`` the reference channels are zeros:
    InstructPix2Pix's "no image" condition, and, with zero-initialised reference weights, exactly
    the teacher (so a teacher, generator and fake score can share one base through LoRA).

    ``alphas_cumprod`` marks a pretrained epsilon-prediction UNet on a DDPM schedule (the hub's
    InstructPix2Pix and SD 1.5): its noise prediction is then re-expressed as a flow velocity,
    see ``_velocity_from_epsilon``. Without it the UNet's output is the velocity itself.
    """

    def __init__(self, unet: UNet2DConditionModel, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.backbone = unet
        self.latent_channels = unet.config.out_channels
        if unet.config.in_channels not in (self.latent_channels, 2 * self.latent_channels):
            raise ValueError(f"UNet in_channels={unet.config.in_channels} must be out_channels "
                             f"({self.latent_channels}, teacher) or twice that (editor).")
        self.takes_reference = unet.config.in_channels == 2 * self.latent_channels
        if alphas_cumprod is not None:
            log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)
            self.register_buffer("_ddpm_log_snr", log_snr.float(), persistent=False)
        else:
            self._ddpm_log_snr = None

    def _time_embedding_module(self) -> nn.Module:
        return self.backbone.time_embedding

    def input_embedding_module(self) -> nn.Module:
        return self.backbone.conv_in

    @property
    def input_feature_dim(self) -> int:
        return self.backbone.config.block_out_channels[0]

    def block_modules(self) -> list[tuple[nn.Module, int]]:
        """The UNet's blocks in the order the input meets them (down, mid, up), each with the
        channels of its output: where an extra signal can be added after every block."""
        channels = list(self.backbone.config.block_out_channels)
        blocks = [(b, c) for b, c in zip(self.backbone.down_blocks, channels)]
        blocks.append((self.backbone.mid_block, channels[-1]))
        blocks += [(b, c) for b, c in zip(self.backbone.up_blocks, reversed(channels))]
        return blocks

    def _unet(self, x, timestep, source_latents, text_states):
        if self.takes_reference:
            reference = torch.zeros_like(x) if source_latents is None else source_latents.to(x.dtype)
            x = torch.cat([x, reference], dim=1)  # InstructPix2Pix: reference on the channels
        return self.backbone(x, timestep, encoder_hidden_states=text_states.to(x.dtype)).sample

    def _velocity(self, x_t, t, text_states, pooled, source_latents):
        dtype = self.backbone.dtype
        if self._ddpm_log_snr is None:
            return self._unet(x_t.to(dtype), t * 1000, source_latents, text_states).to(x_t.dtype)
        return self._velocity_from_epsilon(x_t, t, text_states, source_latents)

    def _velocity_from_epsilon(self, x_t, t, text_states, source_latents):
        """Run a DDPM epsilon-predictor on a flow-matching state.

        ``x_t / sqrt((1-t)^2 + t^2)`` is a variance-preserving state with log-SNR
        ``2 log((1-t)/t)``; it is fed at the (fractional) DDPM timestep of that log-SNR, clamped to
        the schedule's range. From the predicted noise, ``x0 = (x_vp - sqrt(1-a) eps) / sqrt(a)``
        with the schedule's ``a`` at that timestep, and ``v = eps - x0``. At t = 1 this is the
        x0 the DDPM model itself would give at its last timestep.
        """
        table = self._ddpm_log_snr  # decreasing with the DDPM timestep
        tc = t.clamp(1e-6, 1 - 1e-6)
        log_snr = (2 * (torch.log1p(-tc) - torch.log(tc))).clamp(table[-1], table[0])
        # fractional timestep by linear interpolation in log-SNR
        idx = torch.searchsorted(-table, -log_snr).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        timestep = idx - 1 + ((lo - log_snr) / (lo - hi)).clamp(0, 1)
        alpha_bar = torch.sigmoid(log_snr)[:, None, None, None]
        x_vp = x_t / torch.sqrt((1 - t) ** 2 + t**2)[:, None, None, None]
        dtype = self.backbone.dtype
        eps = self._unet(x_vp.to(dtype), timestep, source_latents, text_states).float()
        x0 = (x_vp - torch.sqrt(1 - alpha_bar) * eps) / torch.sqrt(alpha_bar)
        return (eps - x0).to(x_t.dtype)


class DiTEditor(Editor):
    """``FluxTransformer2DModel`` with sequence-concatenated reference tokens (FLUX.1-Kontext).

    The packing follows the FLUX pipelines (``patch_size=1`` in the transformer config,
    ``in_channels = latent_channels * patch**2``), so hub weights and tiny ones load alike.
    ``guidance`` is used only by guidance-distilled transformers (``guidance_embeds=True``).
    """

    def __init__(self, transformer: FluxTransformer2DModel, latent_channels: int,
                 guidance: float = FLUX_DEFAULT_GUIDANCE):
        super().__init__()
        self.backbone = transformer
        self.latent_channels = latent_channels
        in_channels = transformer.config.in_channels
        self.patch = math.isqrt(in_channels // latent_channels)
        if self.patch**2 * latent_channels != in_channels or transformer.proj_out.out_features != in_channels:
            raise ValueError(f"FluxTransformer2DModel in_channels={in_channels} (out "
                             f"{transformer.proj_out.out_features}) is not latent_channels={latent_channels} x patch^2; "
                             "pass the autoencoder's latent_channels (16 for FLUX, 3 for pixels).")
        self.takes_reference = True  # the same module serves as teacher when called without a reference
        self.guidance = guidance

    def _time_embedding_module(self) -> nn.Module:
        return self.backbone.time_text_embed.timestep_embedder

    def input_embedding_module(self) -> nn.Module:
        return self.backbone.x_embedder

    @property
    def input_feature_dim(self) -> int:
        return self.backbone.config.num_attention_heads * self.backbone.config.attention_head_dim

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} must be divisible by the DiT patch {p}.")
        tokens = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, p, c = tokens.shape[0], self.patch, self.latent_channels
        latents = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(b, c, h, w)

    def _positions(self, h: int, w: int, image_index: int, device) -> torch.Tensor:
        """Rotary ids (image index, row, column) per token; Kontext gives the reference index 1."""
        rows, cols = torch.meshgrid(torch.arange(h // self.patch, device=device),
                                    torch.arange(w // self.patch, device=device), indexing="ij")
        ids = torch.stack([torch.full_like(rows, image_index), rows, cols], dim=-1)
        return ids.reshape(-1, 3).float()

    def _velocity(self, x_t, t, text_states, pooled, source_latents):
        dtype, device = self.backbone.dtype, x_t.device
        h, w = x_t.shape[-2:]
        tokens, ids = self._pack(x_t.to(dtype)), self._positions(h, w, 0, device)
        n_target = tokens.shape[1]
        if source_latents is not None:  # Kontext: reference tokens appended on the sequence
            sh, sw = source_latents.shape[-2:]
            tokens = torch.cat([tokens, self._pack(source_latents.to(dtype))], dim=1)
            ids = torch.cat([ids, self._positions(sh, sw, 1, device)], dim=0)
        guidance = None
        if self.backbone.config.guidance_embeds:
            guidance = torch.full((x_t.shape[0],), self.guidance, device=device, dtype=dtype)
        out = self.backbone(
            hidden_states=tokens, encoder_hidden_states=text_states.to(dtype), pooled_projections=pooled.to(dtype),
            timestep=t.to(dtype), img_ids=ids, txt_ids=torch.zeros(text_states.shape[1], 3, device=device),
            guidance=guidance, return_dict=False,
        )[0]
        return self._unpack(out[:, :n_target], h, w).to(x_t.dtype)  # only the target tokens are predicted


def build_editor(backbone: str, config: dict, latent_channels: int = 3) -> Editor:
    """A randomly initialised editor or teacher from a plain config dict (see ``tiny_configs``)."""
    if backbone == "unet":
        return UNetEditor(UNet2DConditionModel.from_config(config))
    if backbone == "dit":
        return DiTEditor(FluxTransformer2DModel.from_config(config), latent_channels)
    raise ValueError(f"backbone={backbone!r} is unknown; use 'unet' or 'dit'.")


def editing_base(model: Editor) -> Editor:
    """A model that can take a reference: ``model`` itself, or a text-to-image UNet widened by
    :func:`editor_from_teacher`. NP-Edit's shared base (generator, teacher, fake score) is this:
    with adapters disabled and no reference it is exactly the teacher."""
    if isinstance(model, UNetEditor) and not model.takes_reference:
        return editor_from_teacher(model)
    return model


def editor_from_teacher(teacher: Editor) -> Editor:
    """An editor initialised from a teacher's weights.

    UNet: the teacher's weights with ``conv_in`` widened to ``2C`` inputs, the new reference
    columns set to zero (InstructPix2Pix sec. 3.2): at initialisation the editor's output equals
    the teacher's, whatever the reference. DiT: a copy with identical weights (reference tokens
    are new positions, not new weights); it equals the teacher when called without a reference,
    and with one the reference tokens already take part in attention.
    """
    if isinstance(teacher, DiTEditor):
        return copy.deepcopy(teacher)
    if not isinstance(teacher, UNetEditor):
        raise TypeError(f"editor_from_teacher needs a UNetEditor or DiTEditor; got {type(teacher).__name__}.")
    if teacher.takes_reference:
        raise ValueError("the teacher UNet already takes reference channels; it is an editor already.")
    unet = teacher.backbone
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": 2 * teacher.latent_channels})
    state = unet.state_dict()
    old = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([old, torch.zeros_like(old)], dim=1)  # zero weights for the reference
    wide.load_state_dict(state)
    wide.to(unet.device)
    if wide.dtype != unet.dtype:
        wide.to(unet.dtype)
    alphas_cumprod = None
    if teacher._ddpm_log_snr is not None:
        alphas_cumprod = torch.sigmoid(teacher._ddpm_log_snr)
    return UNetEditor(wide, alphas_cumprod=alphas_cumprod)
