"""Flow-GRPO and DiffusionNFT losses, reward mapping and EMA (nb_edit.methods.mtrl.policy)."""

import math

import pytest
import torch
from torch import nn

from nb_edit.flow.sampling import sde_step_with_logprob
from nb_edit.methods.mtrl.policy import ema_update, grpo_loss, kl_to_reference, nft_loss, normalise_rewards_01


def test_grpo_loss_at_ratio_one_is_minus_mean_advantage():
    log_prob = torch.randn(4, 3)
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.0])
    loss, stats = grpo_loss(log_prob, log_prob.clone(), advantages, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.5)  # -(1 - 1 + 2 + 0) / 4
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_fraction"] == 0.0


def test_grpo_loss_clipping_by_hand():
    # ratio 1.5 for both samples, clip 0.2:
    #   A = +1: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    #   A = -1: max(+1.5, +1.2) = +1.5 (unclipped, d/dlog_prob = 1.5, halved by the mean)
    log_prob_new = torch.full((2,), math.log(1.5), requires_grad=True)
    loss, stats = grpo_loss(log_prob_new, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clip_fraction"] == 1.0 and stats["ratio_mean"] == pytest.approx(1.5)
    loss.backward()
    assert log_prob_new.grad.tolist() == pytest.approx([0.0, 0.75])


def test_grpo_loss_adds_weighted_kl():
    log_prob = torch.zeros(2, 2)
    kl = torch.tensor([1.0, 3.0])
    loss, stats = grpo_loss(log_prob, log_prob, torch.zeros(2), 0.2, kl=kl, kl_weight=0.1)
    assert loss.item() == pytest.approx(0.2) and stats["kl"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="must match"):
        grpo_loss(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2), 0.2)


def test_kl_to_reference_by_hand_and_against_torch():
    # difference 1 everywhere, std 0.5: 1 / (2 * 0.25) = 2
    assert kl_to_reference(torch.ones(2, 3, 4), torch.zeros(2, 3, 4), 0.5).tolist() == pytest.approx([2.0, 2.0])
    # on two SDE steps of different velocities it is the Gaussian KL averaged over pixels
    x = torch.randn(2, 3, 4, 4)
    _, _, mean, std = sde_step_with_logprob(x, torch.randn_like(x), 0.6, 0.4, 0.7)
    _, _, mean_ref, _ = sde_step_with_logprob(x, torch.randn_like(x), 0.6, 0.4, 0.7)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(mean_ref, std)).mean(dim=(1, 2, 3))
    assert torch.allclose(kl_to_reference(mean, mean_ref, std), expected, atol=1e-5)


def test_nft_loss_by_hand():
    # v_theta 2, v_old 1, target 0, beta .5: v+ = .5 + 1 = 1.5, v- = 1.5 - 1 = .5
    v_theta = torch.tensor([[2.0], [2.0], [2.0]], requires_grad=True)
    v_old = torch.ones(3, 1, requires_grad=True)
    r = torch.tensor([1.0, 0.0, 0.5])
    loss, stats = nft_loss(v_theta, v_old, torch.zeros(3, 1), r, beta=0.5)
    # per sample: 2.25, 0.25, 0.5 * 2.25 + 0.5 * 0.25 = 1.25 -> mean 3.75 / 3
    assert loss.item() == pytest.approx(1.25)
    assert stats["err_positive"] == pytest.approx(2.25) and stats["err_negative"] == pytest.approx(0.25)
    loss.backward()
    # d/dv_theta: r=1: 2 * 1.5 * .5 = 1.5; r=0: 2 * .5 * -.5 = -.5; r=.5: .5; each / 3 for the mean
    assert v_theta.grad.flatten().tolist() == pytest.approx([0.5, -1 / 6, 1 / 6])
    assert v_old.grad is None  # the old policy is a constant


def test_nft_loss_rejects_unmapped_rewards():
    with pytest.raises(ValueError, match="normalise_rewards_01"):
        nft_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1.5, 0.0]), 0.1)


def test_normalise_rewards_01():
    # scale = max |adv| = 2: 0.5 + 0.5 * [-1, 0, 0.5] = [0, 0.5, 0.75]
    assert normalise_rewards_01(torch.tensor([-2.0, 0.0, 1.0])).tolist() == pytest.approx([0.0, 0.5, 0.75])
    # fixed scale 1 clips: [-2, 0, 1] -> [-1, 0, 1] -> [0, 0.5, 1]
    assert normalise_rewards_01(torch.tensor([-2.0, 0.0, 1.0]), scale=1.0).tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert normalise_rewards_01(torch.zeros(3)).tolist() == [0.5, 0.5, 0.5]
    # DiffusionNFT's fixed normaliser (5, MTRLConfig's default) on group-normalised advantages: a
    # batch whose advantages are all small keeps r near 0.5 instead of being stretched to [0, 1]
    small = normalise_rewards_01(torch.tensor([-0.5, 0.0, 0.5]), scale=5.0)
    assert small.tolist() == pytest.approx([0.45, 0.5, 0.55])
    assert normalise_rewards_01(torch.tensor([-7.0, 6.0]), scale=5.0).tolist() == pytest.approx([0.0, 1.0])


def test_ema_update_modules_and_dicts():
    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    for p_old, p_new in zip(old.parameters(), new.parameters()):
        nn.init.zeros_(p_old), nn.init.ones_(p_new)
    ema_update(old, new, decay=0.9)  # .9 * 0 + .1 * 1
    assert torch.allclose(old.weight, torch.full((2, 2), 0.1)) and torch.allclose(old.bias, torch.full((2,), 0.1))
    assert old.weight.requires_grad  # still a trainable parameter, updated in place
    lora_old, lora_new = {"lora_A": torch.zeros(3)}, {"lora_A": torch.full((3,), 2.0)}
    ema_update(lora_old, lora_new, decay=0.75)
    assert lora_old["lora_A"].tolist() == pytest.approx([0.5, 0.5, 0.5])  # .75 * 0 + .25 * 2
    with pytest.raises(ValueError, match="names differ"):
        ema_update(lora_old, {"lora_B": torch.zeros(3)}, 0.9)
    with pytest.raises(ValueError, match="decay"):
        ema_update(lora_old, lora_new, 1.5)
