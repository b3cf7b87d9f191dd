"""Flow-matching training pieces every model here shares: time samplers, the rectified-flow loss
and classifier-free guidance.

Convention: ``x_t = (1 - t) x0 + t eps`` (t = 1 is pure noise), velocity target ``v = eps - x0``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nb_edit.flow.sampling import VelocityFn, add_noise, randn_like

TimeSampler = Callable[[int, torch.Generator | None], Tensor]


def uniform_t(low: float = 0.0, high: float = 1.0) -> TimeSampler:
    """A sampler of ``t ~ U[low, high]`` of shape ``[B]``."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"t range ({low}, {high}) must satisfy 0 <= low < high <= 1.")

    def sample(batch: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        return low + (high - low) * torch.rand(batch, generator=generator, device=device)

    return sample


def logit_normal_t(mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    """``t = sigmoid(n)``, ``n ~ N(mean, std^2)``: SD3's logit-normal sampling (Esser et al. 2024, Sec. 3.1).

    It spends the training on middle noise levels, where the velocity is hardest to predict,
    instead of the nearly-clean and nearly-pure-noise ends that uniform ``t`` wastes steps on.
    """
    if std <= 0:
        raise ValueError(f"logit-normal std={std} must be > 0.")

    def sample(batch: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))

    return sample


def flow_matching_loss(velocity_fn: VelocityFn, x0: Tensor, generator: torch.Generator | None = None,
                       t_sampler: TimeSampler | None = None) -> Tensor:
    """Rectified-flow loss ``E ||v(x_t, t) - (eps - x0)||^2`` (mean over all elements)."""
    t = (t_sampler or uniform_t())(x0.shape[0], generator).to(x0.device, x0.dtype)
    noise = randn_like(x0, generator)
    v = velocity_fn(add_noise(x0, noise, t), t)
    return F.mse_loss(v.float(), (noise - x0).float())  # target velocity v = eps - x0


def cfg_velocity(fn_cond: VelocityFn, fn_uncond: VelocityFn | None, x: Tensor, t: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``v_uncond + g (v_cond - v_uncond)``; ``g = 1`` needs no unconditional call."""
    v_cond = fn_cond(x, t)
    if scale == 1.0:
        return v_cond
    if fn_uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional velocity function; pass fn_uncond.")
    v_uncond = fn_uncond(x, t)
    return v_uncond + scale * (v_cond - v_uncond)  # CFG
