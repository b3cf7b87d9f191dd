"""Flow-matching sampling: the schedule, the few-step Euler sampler, NP-Edit's unroll with
gradient, and Flow-GRPO's SDE step with a Gaussian log-probability.

Convention: ``x_t = (1 - t) * x0 + t * eps``, ``t = 1`` is pure noise, the model
predicts the velocity ``v = eps - x0``, hence ``x0 = x_t - t * v``. A model is any
``velocity_fn(x_t, t) -> v`` with ``t`` of shape ``[B]``; the caller closes over conditioning.

- NP-Edit Sec. 3: a 4-step schedule; training unrolls two steps with gradient through both.
- Flow-GRPO (Liu et al. 2025, Sec. 4.1): the ODE step becomes an SDE step with the same marginals, so
  each step of a rollout has a log-probability for the policy-gradient ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """Noise levels from 1 to 0 (``num_steps + 1`` values), with the SD3 timestep shift."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0 (1.0 means no shift).")
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)  # shift s*t / (1 + (s-1)*t); s > 1 spends more steps near noise


def batch_t(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or ``[B]`` time as a ``[B]`` tensor on ``x``'s device and dtype."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or "
                         f"({x.shape[0]},) for a batch of {x.shape[0]}.")
    return t


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """Reshape ``[B]`` to ``[B, 1, 1, ...]`` so it broadcasts against ``x``."""
    return batch_t(t, x).reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """Forward process ``x_t = (1 - t) x0 + t eps``."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Clean estimate ``x0 = x_t - t v``."""
    return x_t - _per_sample(t, x_t) * v


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device for reproducibility."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _randint(high: int, size: int, generator: torch.Generator | None) -> Tensor:
    """``size`` integers in ``[0, high)`` from ``generator`` (on its device), returned on CPU."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(high, (size,), generator=generator, device=device).cpu()


def euler_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, *, grad: bool = False,
                 return_trajectory: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate the flow ODE from ``noise`` down the schedule ``sigmas``; no gradient unless ``grad``."""
    x, trajectory = noise, [noise]
    with torch.set_grad_enabled(grad):
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            v = velocity_fn(x, batch_t(sigma, x))
            x = x + (sigma_next - sigma) * v  # Euler: dx = v dt, dt < 0
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def _maybe_checkpointed(velocity_fn: VelocityFn, gradient_checkpointing: bool) -> VelocityFn:
    def call(x: Tensor, t: Tensor) -> Tensor:
        if gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(velocity_fn, x, t, use_reentrant=False)  # recompute activations in backward
        return velocity_fn(x, t)
    return call


def one_step_estimate(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, *,
                      gradient_checkpointing: bool = False) -> Tensor:
    """The first generator call of the few-step sampler as a clean estimate: ``x0_hat = eps - G(eps, 1)``
    (the schedule's first sigma). NP-Edit's unroll starts from it; trained alone it is the
    unrolling ablation (no unroll)."""
    t_first = batch_t(float(sigmas[0]), noise)
    return x0_from_velocity(noise, _maybe_checkpointed(velocity_fn, gradient_checkpointing)(noise, t_first), t_first)


def unroll_two_steps(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor,
                     generator: torch.Generator | None = None, *,
                     gradient_checkpointing: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """NP-Edit's training unroll: two generator calls with gradient through both.

    The second time is drawn per sample among the schedule's interior points, and the first
    estimate is re-noised with *fresh* noise, as at inference with a few-step sampler.
    """
    interior = sigmas[1:-1]
    if interior.numel() == 0:
        raise ValueError(f"sigmas={sigmas.tolist()} has no interior point; use a schedule of >= 2 steps.")

    call = _maybe_checkpointed(velocity_fn, gradient_checkpointing)
    x0_hat = one_step_estimate(call, noise, sigmas)  # NP-Edit: x0_hat = eps - G(eps, 1)
    pick = _randint(len(interior), noise.shape[0], generator)
    t = interior[pick].to(device=noise.device, dtype=noise.dtype)  # t ~ {0.75, 0.5, 0.25} for 4 steps
    fresh_noise = randn_like(noise, generator)
    x_t = add_noise(x0_hat, fresh_noise, t)  # re-noise with fresh eps'
    x0 = x0_from_velocity(x_t, call(x_t, t), t)  # the trained output: x0 = x_t - t G(x_t, t)
    return x0, {"x0_hat": x0_hat, "t": t, "x_t": x_t, "fresh_noise": fresh_noise}


def sde_step_with_logprob(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
                          noise_level: float, generator: torch.Generator | None = None,
                          prev_sample: Tensor | None = None, *, sigma_cap: float | None = None,
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Flow-GRPO SDE step; returns ``(x_next, log_prob[B], mean, std)``.

    ``std`` is the transition's standard deviation ``std_t * sqrt(-dt)`` (shape ``[B, 1, ...]``),
    the one a KL between two policies' means divides by. ``prev_sample`` given: its
    log-probability is evaluated instead of drawing a new sample (the ratio of GRPO).
    ``sqrt(sigma / (1 - sigma))`` is infinite at ``sigma = 1``: ``sigma_cap`` (e.g. the schedule's
    second sigma, which ``sde_sample`` passes) bounds the sigma used in it. With
    ``noise_level = 0`` the step is the Euler ODE step and the log-probability is reported as 0.
    """
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    sigma_for_std = sigma if sigma_cap is None else sigma.clamp(max=sigma_cap)
    if noise_level > 0 and bool((sigma_for_std >= 1).any()):
        raise ValueError("sigma = 1 makes the SDE noise infinite; pass sigma_cap=<the schedule's second sigma>.")
    if noise_level < 0:
        raise ValueError(f"noise_level={noise_level} must be >= 0.")
    dt = sigma_next - sigma  # < 0: sigmas decrease
    if noise_level == 0:  # the ODE step; avoids 0 * inf at sigma = 1
        std_t = torch.zeros_like(sigma)
    else:
        std_t = noise_level * torch.sqrt(sigma_for_std / (1 - sigma_for_std))  # Flow-GRPO: std = a sqrt(s / (1 - s))
    mean = (x * (1 + std_t**2 / (2 * sigma) * dt)  # Flow-GRPO SDE mean, drift of x
            + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt)  # ... and of the velocity
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + std * randn_like(x, generator)  # x_next = mean + std sqrt(-dt) eps
    if noise_level == 0:
        return prev_sample, torch.zeros(x.shape[0], device=x.device, dtype=torch.float32), mean, std
    diff, std32 = (prev_sample.detach().float() - mean.float()), std.float()
    log_prob = -diff**2 / (2 * std32**2) - torch.log(std32) - 0.5 * math.log(2 * math.pi)  # log N(x_next; mean, std^2)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, std


@dataclass
class SdeTrajectory:
    """A rollout: ``latents[i]`` is x at ``sigmas[i]`` (``len(sigmas)`` entries); ``log_probs[:, j]``
    is the log-probability of the transition ``latents[k] -> latents[k + 1]`` for ``k = train_steps[j]``."""

    latents: list[Tensor]
    log_probs: Tensor
    train_steps: list[int]
    sigmas: Tensor
    noise_level: float
    sigma_cap: float

    @property
    def x0(self) -> Tensor:
        return self.latents[-1]


@torch.no_grad()
def sde_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor, noise_level: float,
               train_steps: int | Sequence[int] | None = None,
               generator: torch.Generator | None = None) -> SdeTrajectory:
    """Roll out with SDE steps on ``train_steps`` and ODE steps elsewhere (Flow-GRPO "fast").

    ``train_steps``: ``None`` = every step; an int ``k`` = a random window of ``k`` consecutive
    steps (drawn with ``generator``); a sequence = those step indices.
    """
    num_steps = len(sigmas) - 1
    if train_steps is None:
        steps = list(range(num_steps))
    elif isinstance(train_steps, int):
        if not 1 <= train_steps <= num_steps:
            raise ValueError(f"train_steps={train_steps} must be in [1, {num_steps}] for a {num_steps}-step schedule.")
        start = int(_randint(num_steps - train_steps + 1, 1, generator))
        steps = list(range(start, start + train_steps))
    else:
        steps = sorted(set(int(k) for k in train_steps))
        if not steps or steps[0] < 0 or steps[-1] >= num_steps:
            raise ValueError(f"train_steps={list(train_steps)} must be non-empty indices in [0, {num_steps - 1}].")
    sigma_cap = float(sigmas[1]) if num_steps > 1 else 0.99  # bounds the noise of the step from sigma = 1
    x, latents, log_probs = noise, [noise], []
    for k in range(num_steps):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        v = velocity_fn(x, batch_t(sigma, x))
        level = noise_level if k in steps else 0.0  # ODE outside the trained window
        x, log_prob, _, _ = sde_step_with_logprob(x, v, sigma, sigma_next, level, generator, sigma_cap=sigma_cap)
        if k in steps:
            log_probs.append(log_prob)
        latents.append(x)
    return SdeTrajectory(latents, torch.stack(log_probs, dim=1), steps, sigmas, noise_level, sigma_cap)
