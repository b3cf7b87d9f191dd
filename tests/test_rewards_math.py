"""Reward maths on hand-made arrays (nb_edit.rewards.formulas)."""

import math

import pytest
import torch

from nb_edit.rewards.formulas import (
    aggregate_turns,
    broadcast_advantage,
    expected_score,
    full_vocab_ce,
    fuse_rewards,
    group_advantages,
    per_turn_advantages,
    temperature_ramp,
    yesno_loss,
)


def test_yesno_loss_by_hand():
    # equal logits: -log sigmoid(0) = log 2 per question; 2 questions summed, batch averaged -> 2 log 2
    assert yesno_loss(torch.zeros(3, 2), torch.zeros(3, 2)).item() == pytest.approx(2 * math.log(2))
    # margin 1 at temperature 0.5: -log sigmoid(2) = log(1 + e^-2)
    target = torch.tensor([1.0], requires_grad=True)
    loss = yesno_loss(target, torch.tensor([0.0]), temperature=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)))
    loss.backward()  # d/dl_target = -(1 - sigmoid(2)) / 0.5
    assert target.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(-2))) / 0.5)
    with pytest.raises(ValueError, match="must match"):
        yesno_loss(torch.zeros(2), torch.zeros(3))


def test_temperature_ramp():
    assert temperature_ramp(0) == pytest.approx(0.1)
    assert temperature_ramp(1000) == pytest.approx(0.55)
    assert temperature_ramp(2000) == pytest.approx(1.0)
    assert temperature_ramp(10_000) == pytest.approx(1.0)


def test_full_vocab_ce_equals_two_way_loss_on_a_two_token_vocabulary():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.7]])
    # target token 0 ("Yes"): softmax over two tokens is sigmoid of the difference
    assert full_vocab_ce(logits, 0).item() == pytest.approx(yesno_loss(logits[:, 0], logits[:, 1]).item())
    # a larger vocabulary spreads mass to other tokens and raises the loss
    wide = torch.cat([logits, torch.zeros(2, 5)], dim=1)
    assert full_vocab_ce(wide, 0).item() > full_vocab_ce(logits, 0).item()
    with pytest.raises(ValueError, match="vocabulary"):
        full_vocab_ce(logits, 5)


def test_expected_score():
    assert expected_score(torch.zeros(2, 6)).tolist() == pytest.approx([2.5, 2.5])  # uniform over 0..5
    peaked = torch.full((1, 6), -100.0)
    peaked[0, 4] = 100.0
    assert expected_score(peaked).item() == pytest.approx(4.0)
    # two digits with equal mass, values 1 and 5 -> 3
    assert expected_score(torch.zeros(1, 2), values=[1.0, 5.0]).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="values"):
        expected_score(torch.zeros(1, 6), values=[1, 2])


def test_aggregate_turns_by_hand():
    scores = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    assert aggregate_turns(scores, "mean").tolist() == [3.0, 2.0]
    assert aggregate_turns(scores, "min").tolist() == [1.0, 2.0]
    assert aggregate_turns(scores, "last").tolist() == [5.0, 2.0]
    # on [1, 5]: [0, .5, 1] -> product 0 -> 1; [.25]^3 = 1/64 -> 1 + 4/64 = 1.0625
    assert aggregate_turns(scores, "product").tolist() == pytest.approx([1.0, 1.0625])
    assert aggregate_turns(torch.tensor([[5.0, 5.0]]), "product").item() == 5.0
    with pytest.raises(ValueError, match="score_range"):
        aggregate_turns(torch.tensor([[0.0, 5.0]]), "product")
    with pytest.raises(ValueError, match="how"):
        aggregate_turns(scores, "max")


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 0.0, 10.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 9, 9])  # ids need not be contiguous
    adv, flat = group_advantages(rewards, groups)
    # group 7: mean 2, population std sqrt(2/3) -> +-1/sqrt(2/3) = +-1.2247; group 9: mean 5, std 5 -> +-1
    s = 1 / math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([-s, 0.0, s, 0.0, 0.0, -1.0, 1.0], abs=1e-5)
    assert flat.tolist() == [False, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, groups[:3])


def test_fuse_rewards_levels():
    if_scores, cc_scores = torch.tensor([1.0, 5.0, 3.0, 3.0]), torch.tensor([5.0, 1.0, 3.0, 3.0])
    groups = [0, 0, 1, 1]
    # reward level, weights (.7, .3): [0.7 + 1.5, 3.5 + 0.3] = [2.2, 3.8] -> [-1, 1]
    adv, flat = fuse_rewards(if_scores, cc_scores, groups, "reward", (0.7, 0.3))
    assert adv.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0], abs=1e-5)
    # advantage level: 0.7 [-1, 1] + 0.3 [1, -1] = [-0.4, 0.4]
    adv, flat = fuse_rewards(if_scores, cc_scores, groups, "advantage", (0.7, 0.3))
    assert adv.tolist() == pytest.approx([-0.4, 0.4, 0.0, 0.0], abs=1e-5)
    assert flat.tolist() == [False, False, True, True]
    # a flat IF reward with a varying CC reward is not a flat group at advantage level
    _, flat = fuse_rewards(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0]), [0, 0], "advantage")
    assert flat.tolist() == [False, False]
    with pytest.raises(ValueError, match="level"):
        fuse_rewards(if_scores, cc_scores, groups, "score")


def test_broadcast_and_per_turn():
    out = broadcast_advantage(torch.tensor([1.0, -2.0]), n_turns=3, n_steps=4)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[0], torch.ones(3, 4)) and torch.equal(out[1], torch.full((3, 4), -2.0))
    # per turn: [[1, 5], [3, 5]] in one group -> turn 0: [-1, 1], turn 1 flat: [0, 0]
    per_turn, flat = per_turn_advantages(torch.tensor([[1.0, 5.0], [3.0, 5.0]]), [0, 0])
    assert torch.allclose(per_turn, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-5)
    assert flat.tolist() == [[False, True], [False, True]]
    out = broadcast_advantage(per_turn, n_turns=2, n_steps=3)
    assert out[1, 0].tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    with pytest.raises(ValueError, match="n_turns|expected"):
        broadcast_advantage(per_turn, n_turns=3, n_steps=3)
