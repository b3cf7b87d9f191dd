"""The rewards' tensor maths, apart from any VLM: losses and scores from logits, turn
aggregation, group advantages, reward fusion and advantage broadcasting.

- NP-Edit Sec. 3.1: ``L_vlm = - sum_j log sigmoid(l_target_j - l_other_j)``
  on the "Yes"/"No" logits, with an optional temperature ramp; the full-vocabulary
  cross-entropy is the ablation.
- UniWorld-V2 / Edit-R1: an implicit score, the expectation over the digit tokens' softmax.
- MT-EditFlow Sec. 3: turn aggregation, group-normalised advantages, fusion of
  instruction following (IF) and content consistency (CC) at reward or advantage level, and
  broadcasting the trajectory advantage to every turn and denoising step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def yesno_loss(logit_target: Tensor, logit_other: Tensor, temperature: float = 1.0) -> Tensor:
    """NP-Edit's VLM loss; ``[B]`` or ``[B, J]`` logits (J questions summed, batch averaged)."""
    if logit_target.shape != logit_other.shape:
        raise ValueError(f"logit_target {tuple(logit_target.shape)} and logit_other {tuple(logit_other.shape)} must match.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    per_question = -F.logsigmoid((logit_target - logit_other) / temperature)  # NP-Edit: -log sigmoid(l_t - l_o)
    return per_question.reshape(per_question.shape[0], -1).sum(dim=1).mean()  # sum over j, mean over batch


def temperature_ramp(step: int, start: float = 0.1, end: float = 1.0, steps: int = 2000) -> float:
    """Linear ramp of the logit temperature from ``start`` to ``end`` over ``steps``, then constant."""
    if steps <= 0:
        return end
    return start + (end - start) * min(max(step, 0), steps) / steps


def full_vocab_ce(logits_full_vocab: Tensor, target_token_id: int | Tensor) -> Tensor:
    """Ablation: cross-entropy over the whole vocabulary, ``[B, V]`` or ``[B, J, V]`` logits."""
    vocab = logits_full_vocab.shape[-1]
    target = torch.as_tensor(target_token_id, device=logits_full_vocab.device, dtype=torch.long)
    target = target.expand(logits_full_vocab.shape[:-1])
    if bool(((target < 0) | (target >= vocab)).any()):
        raise ValueError(f"target_token_id={target_token_id} is outside the vocabulary of {vocab} tokens.")
    ce = F.cross_entropy(logits_full_vocab.reshape(-1, vocab), target.reshape(-1), reduction="none")
    return ce.reshape(logits_full_vocab.shape[0], -1).sum(dim=1).mean()  # same reduction as yesno_loss


def expected_score(digit_logits: Tensor, values: Sequence[float] | Tensor | None = None) -> Tensor:
    """``sum_k softmax(logits)_k * value_k`` over K digit tokens; values default to 0..K-1."""
    k = digit_logits.shape[-1]
    values = torch.arange(k) if values is None else torch.as_tensor(values)
    if values.shape != (k,):
        raise ValueError(f"values has {values.numel()} entries but digit_logits has {k} digit columns.")
    return digit_logits.float().softmax(dim=-1) @ values.to(digit_logits.device, torch.float32)


def aggregate_turns(scores: Tensor, how: str = "mean", score_range: tuple[float, float] = (1.0, 5.0)) -> Tensor:
    """One score per trajectory from per-turn scores ``[B, T]``: mean, min, product or last.

    ``product`` multiplies scores normalised to [0, 1] by ``score_range`` (a failed turn zeroes
    the trajectory, MT-EditFlow's all-or-nothing view) and maps the product back to the score
    range, so every aggregation is in the judge's units and the fusions below can mix them.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [B, T] (trajectories x turns).")
    if how == "mean":
        return scores.mean(dim=1)
    if how == "min":
        return scores.min(dim=1).values
    if how == "last":
        return scores[:, -1]
    if how == "product":
        low, high = score_range
        if bool(((scores < low) | (scores > high)).any()):
            raise ValueError(f"scores outside score_range={score_range}; pass the judge's scale.")
        unit = (scores - low) / (high - low)
        return low + (high - low) * unit.prod(dim=1)
    raise ValueError(f"how={how!r} is unknown; use one of mean, min, product, last.")


def group_advantages(rewards: Tensor, group_ids: Tensor | Sequence[int], eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(r - mean_group) / (std_group + eps)``; returns ``(advantages[N], zero_var_mask[N])``.

    A group whose rewards are all equal (std <= eps) teaches nothing: its advantages are 0 and
    its samples are flagged so callers can skip and count them.
    """
    rewards = rewards.float()
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [N].")
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1
    count = torch.zeros(n_groups, device=rewards.device).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, device=rewards.device).index_add_(0, group, rewards) / count
    centred = rewards - mean[group]
    var = torch.zeros(n_groups, device=rewards.device).index_add_(0, group, centred**2) / count  # population variance
    std = var.sqrt()[group]
    zero_var = std <= eps
    advantages = torch.where(zero_var, torch.zeros_like(rewards), centred / (std + eps))  # GRPO group normalisation
    return advantages, zero_var


def fuse_rewards(if_scores: Tensor, cc_scores: Tensor, group_ids: Tensor | Sequence[int], level: str = "advantage",
                 weights: tuple[float, float] = (0.5, 0.5), eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """MT-EditFlow's fusion of IF and CC into ``(advantages[N], zero_var_mask[N])``.

    ``reward``: weighted sum of the raw scores, then group normalisation. ``advantage``: each
    score group-normalised first, then the weighted sum, so neither reward's scale dominates
    and hacking one of them buys less. There a group is flagged only if both rewards are flat.
    """
    w_if, w_cc = weights
    if level == "reward":
        return group_advantages(w_if * if_scores.float() + w_cc * cc_scores.float(), group_ids, eps)
    if level == "advantage":
        adv_if, flat_if = group_advantages(if_scores, group_ids, eps)
        adv_cc, flat_cc = group_advantages(cc_scores, group_ids, eps)
        return w_if * adv_if + w_cc * adv_cc, flat_if & flat_cc
    raise ValueError(f"level={level!r} is unknown; use 'reward' or 'advantage'.")


def per_turn_advantages(turn_rewards: Tensor, group_ids: Tensor | Sequence[int], eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The alternative to broadcasting: each turn's rewards ``[N, T]`` normalised within its group."""
    columns = [group_advantages(turn_rewards[:, turn], group_ids, eps) for turn in range(turn_rewards.shape[1])]
    return torch.stack([a for a, _ in columns], dim=1), torch.stack([m for _, m in columns], dim=1)


def broadcast_advantage(advantages: Tensor, n_turns: int, n_steps: int) -> Tensor:
    """``[N]`` trajectory advantages (MT-EditFlow's broadcast) or ``[N, n_turns]`` per-turn ones,
    repeated to every turn and denoising step: ``[N, n_turns, n_steps]``."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(-1, n_turns)  # MT-EditFlow: one advantage for every turn
    if advantages.shape[1] != n_turns:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [N] or [N, {n_turns}].")
    return advantages[:, :, None].expand(-1, -1, n_steps).contiguous()  # ... and every denoising step
