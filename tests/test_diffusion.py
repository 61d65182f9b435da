"""Training objectives and ODE solvers, checked against exact (oracle) denoisers."""

from __future__ import annotations

import pytest
import torch

from sample.solvers import classifier_free_guidance, dpm_solver_pp, sample
from train.diffusion import make_objective

SHAPE = (2, 3, 4, 4)  # [B, C, H, W]


def eps_alpha_sigma(objective, t_net: torch.Tensor):
    alpha, sigma = objective.alpha_sigma(t_net.round().long())
    return alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)


def flow_alpha_sigma(t_net: torch.Tensor):
    t = (t_net / 1000).view(-1, 1, 1, 1)
    return 1 - t, t


def mixture_posterior(x_t, alpha, sigma, means, std):
    """E[x0 | x_t] and E[eps | x_t] for x_t = alpha x0 + sigma eps, x0 ~ mixture N(means_k, std^2).

    means [K, C, H, W] with equal weights; std = 0 is a mixture of points.
    """
    var = alpha**2 * std**2 + sigma**2  # [B, 1, 1, 1]: per-dimension variance of x_t | k
    residual = x_t[:, None] - alpha[:, None] * means[None]  # [B, K, C, H, W]
    log_weight = -(residual**2).sum(dim=(2, 3, 4)) / (2 * var.view(-1, 1))  # [B, K]
    weight = torch.softmax(log_weight, dim=1)[:, :, None, None, None]
    gain = (residual / var[:, None] * weight).sum(dim=1)  # [B, C, H, W]
    x0 = (weight * means[None]).sum(dim=1) + alpha * std**2 * gain
    eps = sigma * gain
    return x0, eps


def eps_oracle(objective, means, std=0.0):
    def denoiser(x_t, t_net):
        return mixture_posterior(x_t, *eps_alpha_sigma(objective, t_net), means, std)[1]

    return denoiser


def flow_oracle(means, std=0.0):
    def denoiser(x_t, t_net):
        x0, eps = mixture_posterior(x_t, *flow_alpha_sigma(t_net), means, std)
        return eps - x0

    return denoiser


@pytest.mark.parametrize("name, options", [("eps", {"schedule": "linear"}),
                                           ("eps", {"schedule": "cosine"})])
def test_eps_target_reconstructs_x0_from_x_t(name, options):
    objective = make_objective(name, **options)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_t, t_net, target = objective.sample_training(x0, torch.Generator().manual_seed(1))
    alpha, sigma = eps_alpha_sigma(objective, t_net)
    torch.testing.assert_close((x_t - sigma * target) / alpha, x0, atol=1e-4, rtol=1e-4)
    assert torch.equal(t_net, t_net.round()) and 0 <= t_net.min() and t_net.max() <= 999


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_flow_target_reconstructs_x0_from_x_t(time_sampling):
    objective = make_objective("flow", time_sampling=time_sampling)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_t, t_net, target = objective.sample_training(x0, torch.Generator().manual_seed(1))
    t = (t_net / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t - t * target, x0, atol=1e-5, rtol=1e-5)
    assert 0 < t_net.min() and t_net.max() < 1000


def test_flow_logit_normal_times_concentrate_in_the_middle():
    objective = make_objective("flow")
    t = objective.sample_time(20000, "cpu", torch.Generator().manual_seed(0))
    assert abs(t.median().item() - 0.5) < 0.01
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6  # uniform would give 0.5
    noisier = make_objective("flow", logit_mean=1.0).sample_time(20000, "cpu", torch.Generator().manual_seed(0))
    assert abs(noisier.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01  # shifted toward noise


def test_a_share_of_times_near_pure_noise_replaces_that_share_and_leaves_the_rest():
    base = make_objective("flow", logit_mean=0.8, logit_std=0.8)
    t = base.sample_time(20000, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(make_objective("flow", logit_mean=0.8, logit_std=0.8, high_t_share=0.0)
                               .sample_time(20000, "cpu", torch.Generator().manual_seed(0)), t)  # 0: unchanged
    mixed = make_objective("flow", logit_mean=0.8, logit_std=0.8, high_t_share=0.3, high_t_from=0.95)
    m = mixed.sample_time(20000, "cpu", torch.Generator().manual_seed(0))
    kept = m == t  # the draws not replaced are the base's own
    assert abs((~kept).float().mean().item() - 0.3) < 0.015 and (m[~kept] >= 0.95).all() and (m < 1).all()
    base_high = (t >= 0.95).float().mean().item()  # about 1% at (0.8, 0.8)
    assert abs((m >= 0.95).float().mean().item() - (0.3 + 0.7 * base_high)) < 0.015
    with pytest.raises(ValueError, match=r"high_t_share must be in \[0, 1\]"):
        make_objective("flow", high_t_share=1.5)


def test_loss_is_fp32_mean_squared_error():
    objective = make_objective("flow")
    prediction, target = torch.ones(SHAPE, dtype=torch.bfloat16), torch.zeros(SHAPE)
    loss = objective.loss(prediction, target)
    assert loss.dtype == torch.float32 and loss.item() == 1.0


def test_make_objective_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="allowed: eps, flow"):
        make_objective("edm")
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        make_objective("eps", schedule="sqrt")
    with pytest.raises(ValueError, match="unknown option"):
        make_objective("flow", schedule="linear")


@pytest.mark.parametrize("objective_name, solver, steps", [
    ("eps", "ddim", 50), ("eps", "dpmpp", 20), ("flow", "euler", 50), ("flow", "heun", 20)])
def test_solver_with_oracle_denoiser_recovers_the_single_data_point(objective_name, solver, steps):
    objective = make_objective(objective_name)
    target = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(0))
    means = target[None]  # [1, C, H, W]: a data set of one point
    oracle = eps_oracle(objective, means) if objective_name == "eps" else flow_oracle(means)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = sample(objective_name, solver, oracle, objective, noise, steps)
    assert (x - target).abs().max() < 1e-3


def two_point_mixture():
    means = torch.stack([torch.full(SHAPE[1:], -1.0), torch.full(SHAPE[1:], 1.0)])
    noise = torch.randn((64, *SHAPE[1:]), generator=torch.Generator().manual_seed(2))
    return means, 0.3, noise


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    means, std, noise = two_point_mixture()
    objective, oracle = make_objective("flow"), flow_oracle(means, std)
    reference = sample("flow", "heun", oracle, objective, noise, 500)
    euler_error = (sample("flow", "euler", oracle, objective, noise, 10) - reference).abs().mean()
    heun_error = (sample("flow", "heun", oracle, objective, noise, 10) - reference).abs().mean()
    assert heun_error < 0.5 * euler_error


def test_dpm_solver_pp_is_more_accurate_than_ddim_at_equal_steps():
    means, std, noise = two_point_mixture()
    objective = make_objective("eps")
    oracle = eps_oracle(objective, means, std)
    reference = dpm_solver_pp(oracle, objective, noise, 1000)
    ddim_error = (sample("eps", "ddim", oracle, objective, noise, 20) - reference).abs().mean()
    dpmpp_error = (sample("eps", "dpmpp", oracle, objective, noise, 20) - reference).abs().mean()
    assert dpmpp_error < 0.5 * ddim_error


def conditional_pair(x, t_net):
    """A doubled-batch denoiser whose rows [:B] answer 2x and rows [B:] answer -x."""
    cond, uncond = x.chunk(2)
    return torch.cat([2 * cond, -uncond])


@pytest.mark.parametrize("scale, expected", [(1.0, 2.0), (0.0, -1.0), (3.0, 8.0)])
def test_guidance_scale_interpolates_from_unconditional_to_conditional(scale, expected):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    guided = classifier_free_guidance(conditional_pair, scale)
    torch.testing.assert_close(guided(x, torch.zeros(SHAPE[0])), expected * x)


def test_guidance_interval_guides_inside_and_asks_for_the_conditional_rows_alone_outside():
    calls = []

    def pair_or_conditional(x, t_net):
        calls.append(x.shape[0])
        return conditional_pair(x, t_net) if x.shape[0] == 2 * SHAPE[0] else 2 * x

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    guided = classifier_free_guidance(pair_or_conditional, 3.0, interval=(0.2, 0.8))
    for t_net, expected, rows in [(500.0, 8.0, 2 * SHAPE[0]), (200.0, 8.0, 2 * SHAPE[0]),  # the bounds are inside
                                  (900.0, 2.0, SHAPE[0]), (100.0, 2.0, SHAPE[0])]:
        torch.testing.assert_close(guided(x, torch.full((SHAPE[0],), t_net)), expected * x)
        assert calls.pop() == rows


@pytest.mark.parametrize("objective_name, solver", [("eps", "euler"), ("flow", "dpmpp")])
def test_solver_that_does_not_fit_the_objective_is_rejected(objective_name, solver):
    objective = make_objective(objective_name)
    with pytest.raises(ValueError, match=f"does not fit objective '{objective_name}'"):
        sample(objective_name, solver, lambda x, t: x, objective, torch.zeros(SHAPE), 2)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_eps_solvers_call_the_network_once_per_step_from_pure_noise_to_step_0(schedule):
    objective = make_objective("eps", schedule=schedule)
    seen = []

    def recording(x, t_net):
        seen.append(t_net[0].item())
        return torch.zeros_like(x)

    sample("eps", "dpmpp", recording, objective, torch.zeros(SHAPE), 20)
    assert len(seen) == 20 and seen[0] == 999 and seen[-1] == 0
    assert all(a > b for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("override, attribute, value", [
    (["train.objective=eps", "train.schedule=cosine", "sample.solver=ddim", "model.prediction=velocity"],
     "schedule", "cosine"),
    (["train.time_sampling=uniform"], "time_sampling", "uniform"),
    (["train.logit_mean=0.5"], "logit_mean", 0.5),
    (["train.logit_std=0.7"], "logit_std", 0.7),
    (["train.high_t_share=0.25"], "high_t_share", 0.25),
    (["train.high_t_from=0.8"], "high_t_from", 0.8),
])
def test_objective_options_are_reachable_from_the_config(override, attribute, value):
    from pathlib import Path

    from store.config import load_config
    from train.diffusion import objective_from_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", override)
    assert getattr(objective_from_config(config.train), attribute) == value


@pytest.mark.parametrize("name", ["flow", "eps"])
def test_at_times_is_training_noising_at_given_times(name):
    """The held-out loss's fixed draws (train/matrix.py) noise exactly as training does."""
    objective = make_objective(name)
    x0 = torch.randn(3, 4, 8, 8)
    t, noise = torch.tensor([0.1, 0.5, 0.9]), torch.randn(3, 4, 8, 8)
    x_t, t_net, target = objective.at_times(x0, t, noise)
    assert torch.allclose(t_net, torch.tensor([100.0, 500.0, 900.0]))
    if name == "flow":
        tv = t.view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - tv) * x0 + tv * noise)
        torch.testing.assert_close(target, noise - x0)
    else:
        alpha, sigma = objective.alpha_sigma(t_net.long())
        torch.testing.assert_close(x_t, alpha.float().view(-1, 1, 1, 1) * x0 + sigma.float().view(-1, 1, 1, 1) * noise)
        assert torch.equal(target, noise)


def test_a_predicted_clean_image_gives_the_flow_target_velocity():
    """model.prediction=sample: the true x0 turns into exactly training's target, eps - x0,
    wherever t is above the clamp; below it, the division uses the clamp, not t."""
    from train.diffusion import SAMPLE_PREDICTION_MIN_T, velocity_from_sample

    objective = make_objective("flow")
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0.05, 0.3, 0.7, 0.999])
    x_t, t_net, target = objective.at_times(x0, t, noise)
    torch.testing.assert_close(velocity_from_sample(x_t, x0, t_net), target, atol=1e-4, rtol=1e-4)
    guess = torch.zeros_like(x0)  # an untrained head's x0, at a time below the clamp
    near_data = torch.tensor([1.0, 0.0, 10.0, 20.0])  # t_net = 1000 t: 0.001, 0, 0.01, 0.02
    torch.testing.assert_close(velocity_from_sample(x_t, guess, near_data), x_t / SAMPLE_PREDICTION_MIN_T)
