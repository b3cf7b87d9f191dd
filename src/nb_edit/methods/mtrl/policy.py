"""Policy losses for flow-matching editors (Flow-GRPO and DiffusionNFT; MT-EditFlow runs both).

- Flow-GRPO: PPO-clip on the per-step ratio ``exp(log_prob_new - log_prob_old)`` of the SDE
  steps (``flow.sampling.sde_step_with_logprob``), plus an optional KL to the reference policy,
  ``||mean - mean_ref||^2 / (2 std^2)``.
- DiffusionNFT: on the forward process, with a slowly updated "old" policy, implicit positive
  and negative velocities ``v+ = (1 - b) v_old + b v`` and ``v- = (1 + b) v_old - b v``, and the
  loss ``r ||v+ - v_target||^2 + (1 - r) ||v- - v_target||^2`` for ``r`` in [0, 1].
Advantages come from ``rewards.formulas`` (group normalisation, fusion, broadcast).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


def _mean_over_sample(x: Tensor) -> Tensor:
    """Average every dimension but the batch: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def kl_to_reference(mean: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """Flow-GRPO's KL between two Gaussian steps of equal ``std``, averaged per sample: ``[B]``."""
    return _mean_over_sample((mean - mean_ref) ** 2 / (2 * torch.as_tensor(std) ** 2))  # ||mu - mu_ref||^2 / (2 std^2)


def grpo_loss(log_prob_new: Tensor, log_prob_old: Tensor, advantages: Tensor, clip_range: float,
              kl: Tensor | None = None, kl_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip on per-step ratios, mean over steps and samples; returns ``(loss, stats)``.

    Log-probabilities are ``[B]`` or ``[B, S]`` (steps); advantages ``[B]`` (broadcast to the
    steps) or the same shape as the log-probabilities. ``kl``, if given, is per sample or step.
    """
    if log_prob_new.shape != log_prob_old.shape:
        raise ValueError(f"log_prob_new {tuple(log_prob_new.shape)} and log_prob_old {tuple(log_prob_old.shape)} must match.")
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range} must be > 0.")
    if advantages.dim() == 1 and log_prob_new.dim() == 2:
        advantages = advantages[:, None]  # one advantage for every step of a trajectory
    advantages = advantages.to(log_prob_new.dtype)
    ratio = torch.exp(log_prob_new - log_prob_old.detach())  # pi_new / pi_old per step
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)  # PPO-clip
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss
    stats = {"policy_loss": policy_loss.item(), "ratio_mean": ratio.mean().item(),
             "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item()}
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + kl_weight * kl_mean
        stats["kl"] = kl_mean.item()
    return loss, stats


def nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, beta: float) -> tuple[Tensor, dict[str, float]]:
    """DiffusionNFT's loss: per-sample mean squared errors of the implicit policies, batch mean.

    ``r`` is ``[B]`` in [0, 1] (``normalise_rewards_01``); ``v_old`` is treated as a constant.
    """
    if not v_theta.shape == v_old.shape == v_target.shape:
        raise ValueError(f"v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)} and v_target "
                         f"{tuple(v_target.shape)} must have the same shape.")
    if r.shape != (v_theta.shape[0],) or bool(((r < 0) | (r > 1)).any()):
        raise ValueError(f"r must be [{v_theta.shape[0]}] with values in [0, 1]; map advantages with normalise_rewards_01.")
    v_old = v_old.detach()
    v_positive = (1 - beta) * v_old + beta * v_theta  # DiffusionNFT implicit positive policy
    v_negative = (1 + beta) * v_old - beta * v_theta  # ... and implicit negative policy
    err_positive = _mean_over_sample((v_positive - v_target) ** 2)
    err_negative = _mean_over_sample((v_negative - v_target) ** 2)
    loss = (r * err_positive + (1 - r) * err_negative).mean()  # r ||v+ - v||^2 + (1 - r) ||v- - v||^2
    return loss, {"err_positive": err_positive.mean().item(), "err_negative": err_negative.mean().item()}


def normalise_rewards_01(advantages: Tensor, scale: float | None = None) -> Tensor:
    """Map advantages to DiffusionNFT's ``r`` in [0, 1]: ``0.5 + 0.5 * clip(adv / scale, -1, 1)``.

    A fixed ``scale`` is DiffusionNFT's normaliser (5 on group-normalised advantages, which also
    clips outliers; ``MTRLConfig.nft_r_scale``); None takes the batch's ``max |adv|`` (the best
    sample gets 1, the worst 0 when symmetric). Zero advantage gives 0.5, where the two terms of
    the loss balance and only pull ``v`` toward ``v_old``.
    """
    advantages = advantages.float()
    if scale is None:
        scale = float(advantages.abs().max()) if advantages.numel() else 0.0
    if scale <= 0:
        return torch.full_like(advantages, 0.5)
    return 0.5 + 0.5 * (advantages / scale).clamp(-1.0, 1.0)


def _named_tensors(params: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(params.named_parameters()) if isinstance(params, nn.Module) else dict(params)


@torch.no_grad()
def ema_update(old_params: nn.Module | Mapping[str, Tensor], new_params: nn.Module | Mapping[str, Tensor],
               decay: float) -> None:
    """In place ``old <- decay * old + (1 - decay) * new`` for the old policy: modules (their
    parameters; buffers are left alone) or name -> tensor dicts such as LoRA state dicts."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay} must be in [0, 1].")
    old, new = _named_tensors(old_params), _named_tensors(new_params)
    if old.keys() != new.keys():
        raise ValueError(f"parameter names differ: only in old {sorted(old.keys() - new.keys())[:5]}, "
                         f"only in new {sorted(new.keys() - old.keys())[:5]}.")
    for name, tensor in old.items():
        tensor.lerp_(new[name].to(tensor.device, tensor.dtype), 1.0 - decay)  # EMA
