"""Inference with an editor or a teacher: text in, velocity field out, few-step sampling.

One object bundles what every method needs around an :class:`~nb_edit.models.editors.Editor`:
the text encoder, the autoencoder, and the closures that turn (instruction or caption, source
image) into a ``velocity_fn(x_t, t)`` for :mod:`nb_edit.flow.sampling`. The same closures serve the
NP-Edit unroll, DMD's real and fake scores, RL rollouts and plain evaluation, so conditioning
is built in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from nb_edit.core.images import check_image_tensor, to_tensor, to_uint8
from nb_edit.core.runtime import pick_device, resolve_dtype
from nb_edit.flow.losses import cfg_velocity
from nb_edit.flow.sampling import VelocityFn, euler_sample, flow_sigmas
from nb_edit.models.editors import editing_base
from nb_edit.models.loaders import load_autoencoder, load_editor, load_teacher, load_text_encoder
from nb_edit.models.text import NULL_TEXT


@dataclass
class Conditioning:
    """Encoded text (and optionally the source latents) for one batch."""

    text_states: Tensor
    pooled: Tensor
    source_latents: Tensor | None = None
    extra_time_embedding: Tensor | None = None


class EditPipeline:
    """An editor (or teacher) with its text encoder and autoencoder.

    ``velocity_fn(cond)`` closes over a :class:`Conditioning`; ``edit`` and ``generate`` run
    the few-step Euler sampler of NP-Edit (4 steps, optional timestep shift).
    """

    def __init__(self, model, text_encoder, autoencoder, shift: float = 1.0):
        self.model, self.text_encoder, self.autoencoder, self.shift = model, text_encoder, autoencoder, shift

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def condition(self, texts: Sequence[str], sources: Tensor | None = None,
                  grad_text: bool = False) -> Conditioning:
        """Encode ``texts`` (instructions or captions) and the source images in [-1, 1]."""
        with torch.set_grad_enabled(grad_text):
            states, pooled, _ = self.text_encoder.encode(list(texts))
        source_latents = None
        if sources is not None:
            with torch.no_grad():
                source_latents = self.autoencoder.encode(sources.to(self.device))
        return Conditioning(states, pooled, source_latents)

    def null_condition(self, cond: Conditioning) -> Conditioning:
        """The same batch with the empty text: the unconditional branch of CFG.

        The source image (and any reward condition) is kept, as in every CFG branch of
        Multi-Reward and of instruction-only guidance.
        """
        null = self.condition([NULL_TEXT] * cond.text_states.shape[0])
        return Conditioning(null.text_states, null.pooled, cond.source_latents, cond.extra_time_embedding)

    def velocity_fn(self, cond: Conditioning, model=None) -> VelocityFn:
        model = model or self.model

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            return model(x_t, t, cond.text_states, cond.pooled, source_latents=cond.source_latents,
                         extra_time_embedding=cond.extra_time_embedding)

        return fn

    def guided_velocity_fn(self, cond: Conditioning, guidance: float = 1.0, model=None) -> VelocityFn:
        """Text classifier-free guidance (``guidance == 1`` is the plain conditional model)."""
        cond_fn = self.velocity_fn(cond, model)
        if guidance == 1.0:
            return cond_fn
        uncond_fn = self.velocity_fn(self.null_condition(cond), model)
        return lambda x, t: cfg_velocity(cond_fn, uncond_fn, x, t, guidance)

    def sigmas(self, steps: int) -> Tensor:
        return flow_sigmas(steps, self.shift).to(self.device)

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, int, int, int]:
        """The latents of ``batch`` images of ``resolution`` pixels: pixels themselves in the tiny
        profile, ``[B, 16, H/8, W/8]`` for FLUX's autoencoder, ``[B, 4, H/8, W/8]`` for SD's."""
        channels, down = self.autoencoder.latent_channels, self.autoencoder.downsample
        if resolution % down:
            raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's downsampling {down}.")
        return batch, channels, resolution // down, resolution // down

    def noise_like_latents(self, batch: int, resolution: int, seed: int | torch.Generator) -> Tensor:
        """Gaussian noise in the latent shape, drawn on the CPU (the same numbers on every device)
        from ``seed`` or from a generator the caller keeps."""
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        return torch.randn(self.latent_shape(batch, resolution), generator=gen).to(self.device)

    def sample(self, velocity_fn: VelocityFn, batch: int, resolution: int, steps: int, seed: int) -> np.ndarray:
        """Few-step Euler sampling of ``velocity_fn`` from seeded noise, decoded to uint8 images."""
        noise = self.noise_like_latents(batch, resolution, seed)
        return to_uint8(self.autoencoder.decode(euler_sample(velocity_fn, noise, self.sigmas(steps))))

    @torch.no_grad()
    def edit(self, sources: np.ndarray | Tensor, instructions: Sequence[str], steps: int = 4,
             seed: int = 0, guidance: float = 1.0, cond: Conditioning | None = None) -> np.ndarray:
        """Edit uint8 images (B, H, W, 3) (or float tensors (B, 3, H, W) in [-1, 1]) -> uint8 images.

        A tensor with NaN, Inf, another range or layout raises ``BadInputError`` naming ``sources``.
        """
        src = check_image_tensor(sources, "sources") if isinstance(sources, Tensor) else to_tensor(sources)
        cond = cond or self.condition(instructions, src)
        return self.sample(self.guided_velocity_fn(cond, guidance), src.shape[0], src.shape[-1], steps, seed)

    @torch.no_grad()
    def generate(self, captions: Sequence[str], resolution: int, steps: int = 4, seed: int = 0,
                 guidance: float = 1.0) -> np.ndarray:
        """Text-to-image with a teacher (no source image) -> uint8 images."""
        cond = self.condition(captions)
        return self.sample(self.guided_velocity_fn(cond, guidance), len(captions), resolution, steps, seed)


def load_pipeline(folder: str | Path, backbone: str = "auto", as_teacher: bool = False,
                  device: str | torch.device = "auto", dtype: str = "auto"):
    """A shipped stand-in, a hub-layout folder or a hub id as an :class:`EditPipeline`: its
    editor (or teacher), its text encoder(s), and its autoencoder (``vae/``: latents; none: pixels).

    ``device`` "auto" is the accelerator's (CUDA when present); ``dtype`` "auto" is bf16 there and
    fp32 on CPU (``core.runtime.resolve_dtype``).
    """
    device = pick_device(device)
    dtype = resolve_dtype(dtype, device, "load_pipeline(dtype)")
    # a text-to-image UNet asked to edit is widened (zero reference weights): it starts as the teacher
    model = (load_teacher(folder, backbone, dtype=dtype, device=device) if as_teacher
             else editing_base(load_editor(folder, backbone, dtype=dtype, device=device)))
    return EditPipeline(model.eval(), load_text_encoder(folder, dtype=dtype, device=device).eval(),
                        load_autoencoder(folder, dtype=dtype, device=device))
