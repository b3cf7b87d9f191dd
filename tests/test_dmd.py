"""DMD generator loss, fake-score loss, CFG and the flow-matching loss (nb_edit.methods.npedit.dmd)."""

import pytest
import torch
from torch import nn

from nb_edit.flow.losses import cfg_velocity, flow_matching_loss, uniform_t
from nb_edit.methods.npedit.dmd import dmd_generator_loss, fake_score_loss

torch.set_num_threads(1)


def real_velocity(x, t):
    return 0.5 * x


def fake_velocity(x, t):
    return 0.3 * x + 0.1 * t[:, None, None, None]


def test_cfg_velocity_by_hand():
    cond, uncond = (lambda x, t: torch.full_like(x, 3.0)), (lambda x, t: torch.full_like(x, 1.0))
    x, t = torch.zeros(2, 4), torch.ones(2)
    assert torch.equal(cfg_velocity(cond, uncond, x, t, 2.0), torch.full_like(x, 5.0))  # 1 + 2 (3 - 1)
    assert torch.equal(cfg_velocity(cond, None, x, t, 1.0), torch.full_like(x, 3.0))  # no uncond call at g = 1
    with pytest.raises(ValueError, match="fn_uncond"):
        cfg_velocity(cond, None, x, t, 3.5)


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    # x0 = 0: x_t = t eps, the exact velocity is eps = x_t / t
    x0 = torch.zeros(8, 3, 4, 4)
    generator = torch.Generator().manual_seed(0)
    exact = flow_matching_loss(lambda x, t: x / t[:, None, None, None], x0, generator, uniform_t(0.1, 1.0))
    assert exact.item() == pytest.approx(0.0, abs=1e-10)
    zero = flow_matching_loss(lambda x, t: torch.zeros_like(x), x0, generator)
    assert zero.item() == pytest.approx(1.0, abs=0.15)  # E eps^2 = 1


def test_fake_score_loss_trains_the_fake_score_only():
    net = nn.Conv2d(3, 3, 1)
    x0 = torch.randn(4, 3, 4, 4, requires_grad=True)
    fake_score_loss(lambda x, t: net(x), x0, torch.Generator().manual_seed(0)).backward()
    assert x0.grad is None
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_dmd_gradient_is_the_normalised_direction(guidance):
    x0 = torch.randn(3, 2, 4, 4, requires_grad=True)
    uncond = lambda x, t: -0.2 * x  # noqa: E731
    loss, info = dmd_generator_loss(x0, real_velocity, fake_velocity, torch.Generator().manual_seed(0),
                                    guidance=guidance, real_uncond_velocity_fn=uncond)
    loss.backward()
    # by hand, with the same draws: t ~ U[0.02, 0.98], then eps
    generator = torch.Generator().manual_seed(0)
    t = 0.02 + 0.96 * torch.rand(3, generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0.detach() + tb * eps
    v_real = uncond(x_t, t) + guidance * (real_velocity(x_t, t) - uncond(x_t, t))
    x0_real, x0_fake = x_t - tb * v_real, x_t - tb * fake_velocity(x_t, t)
    normaliser = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    direction = (x0_fake - x0_real) / normaliser
    assert torch.allclose(x0.grad, direction / x0.numel(), atol=1e-7)  # mean-reduced 0.5 ||.||^2
    assert loss.item() == pytest.approx(0.5 * direction.pow(2).mean().item(), rel=1e-5)
    assert info["grad_norm"].item() == pytest.approx(direction.flatten(1).norm(dim=1).mean().item(), rel=1e-5)
    assert torch.allclose(info["t"], t)


def test_dmd_has_no_gradient_when_fake_equals_real():
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss, _ = dmd_generator_loss(x0, real_velocity, real_velocity, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x0.grad, torch.zeros_like(x0))


def test_dmd_step_moves_toward_the_real_prediction():
    # one descent step shrinks the gap between x0 and the real model's clean estimate
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss, info = dmd_generator_loss(x0, real_velocity, fake_velocity, torch.Generator().manual_seed(0))
    loss.backward()
    before = (x0.detach() - info["x0_fake"]).pow(2).sum() - (x0.detach() - info["x0_real"]).pow(2).sum()
    stepped = x0.detach() - 10.0 * x0.grad
    after = (stepped - info["x0_fake"]).pow(2).sum() - (stepped - info["x0_real"]).pow(2).sum()
    assert after > before  # farther from the fake estimate relative to the real one


def test_uniform_t_range_checked():
    with pytest.raises(ValueError, match="range"):
        uniform_t(0.5, 0.2)
    t = uniform_t(0.02, 0.98)(1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0.02 and t.max() <= 0.98
