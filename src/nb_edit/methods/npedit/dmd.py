"""Distribution matching (DMD2) as used by NP-Edit (NP-Edit Sec. 3.2; DMD2, Yin et al. 2024).

The generator's output ``x0`` is noised at a random ``t``; a frozen "real" score (the
pretrained text-to-image model on the edited caption, with classifier-free guidance) and an
online "fake" score (trained on the generator's outputs) each predict a clean image. Their
difference, normalised per sample, is the KL gradient that pulls ``x0`` toward the real
distribution, applied through the surrogate ``0.5 * ||x0 - stopgrad(x0 - g)||^2``.
The fake score learns with the plain flow-matching loss, the same one any supervised editor uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nb_edit.flow.losses import cfg_velocity, flow_matching_loss, uniform_t
from nb_edit.flow.sampling import VelocityFn, add_noise, randn_like, x0_from_velocity


def fake_score_loss(fake_velocity_fn: VelocityFn, x0_detached: Tensor, generator: torch.Generator | None = None,
                    t_range: tuple[float, float] = (0.02, 0.98)) -> Tensor:
    """The fake score's update on the generator's (detached) outputs, over the DMD time range."""
    return flow_matching_loss(fake_velocity_fn, x0_detached.detach(), generator, uniform_t(*t_range))


def dmd_generator_loss(x0: Tensor, real_velocity_fn: VelocityFn, fake_velocity_fn: VelocityFn,
                       generator: torch.Generator | None = None, t_range: tuple[float, float] = (0.02, 0.98),
                       guidance: float = 1.0, real_uncond_velocity_fn: VelocityFn | None = None,
                       eps: float = 1e-8) -> tuple[Tensor, dict[str, Tensor]]:
    """The DMD generator loss and its diagnostics.

    ``guidance`` and ``real_uncond_velocity_fn`` apply CFG to the real score through
    ``cfg_velocity`` (NP-Edit: 3.5, 7.5 for remove / shape / style / action edits).
    The loss is a mean over elements, so ``d loss / d x0 = g / x0.numel()``.
    """
    with torch.no_grad():
        x0_detached = x0.detach()
        t = uniform_t(*t_range)(x0.shape[0], generator).to(x0.device, x0.dtype)  # t ~ U[0.02, 0.98]
        x_t = add_noise(x0_detached, randn_like(x0_detached, generator), t)
        v_real = cfg_velocity(real_velocity_fn, real_uncond_velocity_fn, x_t, t, guidance)
        x0_real = x0_from_velocity(x_t, v_real, t)  # map both scores to x0 space
        x0_fake = x0_from_velocity(x_t, fake_velocity_fn(x_t, t), t)
        dims = tuple(range(1, x0.dim()))
        normaliser = (x0_detached - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)  # per sample
        grad = torch.nan_to_num((x0_fake - x0_real) / normaliser)  # DMD gradient in x0 space
    loss = 0.5 * F.mse_loss(x0.float(), (x0_detached - grad).float())  # 0.5 ||x0 - stopgrad(x0 - g)||^2
    info = {"t": t, "grad_norm": grad.flatten(1).norm(dim=1).mean(), "normaliser": normaliser.flatten().mean(),
            "x0_real": x0_real, "x0_fake": x0_fake}
    return loss, info
