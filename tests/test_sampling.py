"""Flow schedule, Euler sampler, NP-Edit unroll and Flow-GRPO SDE step (nb_edit.flow.sampling)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from nb_edit.flow.sampling import (
    euler_sample,
    flow_sigmas,
    one_step_estimate,
    sde_sample,
    sde_step_with_logprob,
    unroll_two_steps,
)

torch.set_num_threads(1)


def scheduler_for(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, num_steps + 1)[:-1].tolist())
    return scheduler


def nonlinear_velocity(x, t):
    return torch.tanh(x) * (1 + t[:, None, None, None]) - 0.3 * x


def test_flow_sigmas_by_hand():
    assert torch.allclose(flow_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift 3 at t = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75; at t = 0.25: 0.75 / 1.5 = 0.5
    assert torch.allclose(flow_sigmas(4, shift=3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


@pytest.mark.parametrize("num_steps,shift", [(4, 1.0), (4, 6.0), (10, 3.0), (28, 1.5)])
def test_flow_sigmas_match_diffusers(num_steps, shift):
    expected = scheduler_for(num_steps, shift).sigmas
    assert torch.allclose(flow_sigmas(num_steps, shift), expected, atol=1e-6)


def test_flow_sigmas_rejects_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(4, shift=0.0)


def test_euler_constant_velocity_lands_on_x0():
    # v = eps - c everywhere: the steps' dt sum to -1, so x0 = eps - (eps - c) = c exactly
    noise, c = torch.randn(2, 3, 4, 4), 0.25
    x0, trajectory = euler_sample(lambda x, t: noise - c, noise, flow_sigmas(4), return_trajectory=True)
    assert torch.allclose(x0, torch.full_like(noise, c), atol=1e-6)
    assert len(trajectory) == 5 and trajectory[0] is noise


def test_euler_matches_diffusers_step():
    noise, sigmas = torch.randn(2, 3, 4, 4), flow_sigmas(6, shift=3.0)
    scheduler, x = scheduler_for(6, 3.0), noise
    for timestep, sigma in zip(scheduler.timesteps, sigmas[:-1]):
        x = scheduler.step(nonlinear_velocity(x, sigma.expand(2)), timestep, x).prev_sample
    assert torch.allclose(euler_sample(nonlinear_velocity, noise, sigmas), x, atol=1e-5)


def test_euler_sample_has_no_grad_by_default():
    net = nn.Conv2d(3, 3, 1)
    x0 = euler_sample(lambda x, t: net(x), torch.randn(1, 3, 4, 4), flow_sigmas(2))
    assert not x0.requires_grad
    assert euler_sample(lambda x, t: net(x), torch.randn(1, 3, 4, 4), flow_sigmas(2), grad=True).requires_grad


def unroll_loss(net, gradient_checkpointing=False, detach_first=False):
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def velocity(x, t):
        out = net(x) * (1 + t[:, None, None, None])
        return out.detach() if detach_first and bool((t == 1).all()) else out

    x0, info = unroll_two_steps(velocity, noise, flow_sigmas(4), torch.Generator().manual_seed(2),
                                gradient_checkpointing=gradient_checkpointing)
    return (x0**2).sum(), info


def test_unroll_gradient_flows_through_both_steps():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 3, 1).double()
    loss, info = unroll_loss(net)
    (grad,) = torch.autograd.grad(loss, net.weight)
    # central finite difference on one weight, same seeds: the full chain rule, first call included
    h, index = 1e-6, (1, 2, 0, 0)
    with torch.no_grad():
        net.weight[index] += h
        up = unroll_loss(net)[0].item()
        net.weight[index] -= 2 * h
        down = unroll_loss(net)[0].item()
        net.weight[index] += h
    assert grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-5)
    # cutting the first call changes the gradient: the first step contributes
    (grad_cut,) = torch.autograd.grad(unroll_loss(net, detach_first=True)[0], net.weight)
    assert (grad - grad_cut).abs().max() > 1e-3
    # checkpointing recomputes, it does not change the gradient
    (grad_ckpt,) = torch.autograd.grad(unroll_loss(net, gradient_checkpointing=True)[0], net.weight)
    assert torch.allclose(grad, grad_ckpt)
    assert set(info["t"].tolist()) <= {0.75, 0.5, 0.25}


def test_one_step_estimate_is_the_unrolls_first_call():
    """The no-unroll ablation trains x0_hat = eps - G(eps, 1): one call, at t = 1, as the unroll's first."""
    net, calls = nn.Conv2d(3, 3, 1), []

    def velocity(x, t):
        calls.append(t.tolist())
        return net(x)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x0_hat = one_step_estimate(velocity, noise, flow_sigmas(4))
    assert calls == [[1.0, 1.0]]
    assert torch.allclose(x0_hat, noise - net(noise))
    _, info = unroll_two_steps(velocity, noise, flow_sigmas(4), torch.Generator().manual_seed(2))
    assert torch.allclose(info["x0_hat"], x0_hat) and len(calls) == 3  # the unroll adds one call
    assert x0_hat.requires_grad  # the gradient reaches G


def test_unroll_uses_fresh_noise_and_interior_times():
    noise = torch.randn(64, 1, 2, 2)
    _, info = unroll_two_steps(lambda x, t: x, noise, flow_sigmas(4), torch.Generator().manual_seed(0))
    assert not torch.allclose(info["fresh_noise"], noise)
    assert set(info["t"].tolist()) == {0.75, 0.5, 0.25}  # 64 draws reach all three
    with pytest.raises(ValueError, match="interior"):
        unroll_two_steps(lambda x, t: x, noise, flow_sigmas(1))


def test_sde_step_at_noise_zero_is_euler_and_diffusers():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigmas = flow_sigmas(4, shift=3.0)
    scheduler = scheduler_for(4, 3.0)
    for k, timestep in enumerate(scheduler.timesteps):
        x_next, log_prob, mean, _ = sde_step_with_logprob(x, v, sigmas[k], sigmas[k + 1], noise_level=0.0)
        assert torch.allclose(x_next, x + (sigmas[k + 1] - sigmas[k]) * v, atol=1e-6)
        assert torch.allclose(x_next, scheduler.step(v, timestep, x).prev_sample, atol=1e-6)
        assert torch.equal(log_prob, torch.zeros(2))


def test_sde_step_mean_std_and_log_prob_by_hand():
    # sigma 0.5, sigma_next 0.25, noise_level 0.5: std_t = 0.5 sqrt(0.5 / 0.5) = 0.5, dt = -0.25
    # mean = x (1 + 0.25 / 1 * -0.25) + v (1 + 0.25 * 0.5 / 1) * -0.25 = 0.9375 x - 0.28125 v
    # std = 0.5 * sqrt(0.25) = 0.25
    x, v, prev = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    out, log_prob, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, 0.5, prev_sample=prev)
    assert out is prev
    assert torch.allclose(mean, 0.9375 * x - 0.28125 * v, atol=1e-6)
    assert torch.allclose(std, torch.full((3, 1, 1, 1), 0.25))
    expected = torch.distributions.Normal(0.9375 * x - 0.28125 * v, 0.25).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-5)


def test_sde_step_samples_have_the_stated_std():
    x = torch.zeros(20000, 1)
    x_next, _, mean, std = sde_step_with_logprob(x, torch.zeros_like(x), 0.5, 0.25, 0.5,
                                                 generator=torch.Generator().manual_seed(0))
    assert (x_next - mean).std().item() == pytest.approx(0.25, rel=0.03)


def test_sde_step_needs_a_cap_at_sigma_one():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="sigma_cap"):
        sde_step_with_logprob(x, x, 1.0, 0.75, 0.7)
    _, log_prob, _, std = sde_step_with_logprob(x, x, 1.0, 0.75, 0.7, sigma_cap=0.75)
    assert torch.isfinite(log_prob).all() and torch.isfinite(std).all()


def test_sde_sampling_keeps_the_flow_marginal():
    # data x0 ~ N(0, 0.5^2): x_t ~ N(0, ((1-t) 0.5)^2 + t^2) and the exact velocity is linear in x_t.
    # A correct SDE (same marginals as the ODE) must end with std 0.5 at any noise level.
    def exact_velocity(x, t):
        t = t[:, None]
        return x * (t - (1 - t) * 0.25) / (((1 - t) * 0.5) ** 2 + t**2)

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    for noise_level in (0.0, 0.8):
        trajectory = sde_sample(exact_velocity, noise, flow_sigmas(100), noise_level, generator=torch.Generator().manual_seed(1))
        assert trajectory.x0.std().item() == pytest.approx(0.5, abs=0.015)


def test_sde_sample_fast_window_and_log_prob_replay():
    noise, sigmas = torch.randn(2, 3, 4, 4), flow_sigmas(6)
    trajectory = sde_sample(nonlinear_velocity, noise, sigmas, 0.7, train_steps=2, generator=torch.Generator().manual_seed(0))
    steps = trajectory.train_steps
    assert len(steps) == 2 and steps[1] == steps[0] + 1
    assert trajectory.log_probs.shape == (2, 2) and len(trajectory.latents) == 7
    for k in range(6):
        x, x_next = trajectory.latents[k], trajectory.latents[k + 1]
        v = nonlinear_velocity(x, sigmas[k].expand(2))
        if k not in steps:  # ODE outside the window
            assert torch.allclose(x_next, x + (sigmas[k + 1] - sigmas[k]) * v, atol=1e-6)
        else:  # recomputing the log-probability of the stored transition gives the stored value
            _, log_prob, _, _ = sde_step_with_logprob(x, v, sigmas[k], sigmas[k + 1], 0.7, prev_sample=x_next,
                                                      sigma_cap=trajectory.sigma_cap)
            assert torch.allclose(log_prob, trajectory.log_probs[:, steps.index(k)], atol=1e-5)
    ode = sde_sample(nonlinear_velocity, noise, sigmas, 0.0, train_steps=[0, 3])
    assert torch.allclose(ode.x0, euler_sample(nonlinear_velocity, noise, sigmas), atol=1e-6)
    with pytest.raises(ValueError, match="train_steps"):
        sde_sample(nonlinear_velocity, noise, sigmas, 0.7, train_steps=[6])
    assert not math.isnan(trajectory.log_probs.sum().item())
