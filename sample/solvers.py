"""ODE solvers that turn noise into data, and classifier-free guidance.

A `Denoiser` maps (x_t [B, C, H, W], t_net [B] float) to the network's prediction (eps
for the "eps" objective, velocity v = eps - x0 for "flow"); t_net is what the network
was trained on (train/diffusion.py). Solvers only ever call a Denoiser, so they neither
know nor care whether guidance is on.

Guidance design: `classifier_free_guidance(model_fn, scale)` wraps ONE network call over
a doubled batch. The caller binds the conditioning into `model_fn` so that rows [:B] of
the doubled batch see the prompt and rows [B:] the empty prompt; the wrapper feeds
[x; x] at [t; t] and returns uncond + scale * (cond - uncond). One forward per step
instead of two, and the solvers stay guidance-free. With a guidance `interval` the wrapper
guides only at times inside it; outside, it feeds the B rows of x alone, which `model_fn`
must answer with the conditional prediction (its first B rows of conditioning).

Every solver has the signature (denoiser, objective, noise, steps, *, progress) so
`sample` can dispatch by name:
- eps: `ddim` (Song et al. 2021) and `dpm_solver_pp` (DPM-Solver++(2M), Lu et al. 2022,
  data prediction, multistep). Both walk the same grid of integer steps, uniform in
  logSNR (Lu et al.'s advice for low-resolution images), from the last training step,
  where x_T is pure noise, to step 0; the last update lands on clean data (abar = 1).
  Sharing the grid makes the two comparable: they differ only in the solver's order.
- flow: `euler` and `heun` (2nd order, as in EDM, Karras et al. 2022) from t = 1
  (noise) to t = 0 (data) on dx/dt = v.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from store.config import SOLVERS_FOR_OBJECTIVE
from train.diffusion import NUM_TRAIN_STEPS, EpsilonObjective, FlowObjective, Objective

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t_net) -> prediction


def classifier_free_guidance(model_fn: Denoiser, scale: float,
                             interval: tuple[float, float] = (0.0, 1.0)) -> Denoiser:
    """Guide a doubled-batch denoiser: rows [:B] conditional, rows [B:] unconditional.

    scale 1 gives the conditional prediction, scale 0 the unconditional one (Ho & Salimans).
    interval (low, high): guide only where low <= t_net / 1000 <= high (the solvers give every
    row one time); elsewhere one B-row call, the conditional prediction (Kynkäänniemi et al. 2024).
    """
    low, high = interval

    def guided(x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        if (low, high) != (0.0, 1.0) and not low <= float(t_net[0]) / NUM_TRAIN_STEPS <= high:
            return model_fn(x, t_net).float()  # [B, C, H, W]: the conditional rows alone
        prediction = model_fn(torch.cat([x, x]), torch.cat([t_net, t_net]))  # [2B, C, H, W]
        cond, uncond = prediction.float().chunk(2)  # [B, C, H, W] each
        return uncond + scale * (cond - uncond)

    return guided


def _batch_time(value: float, x: torch.Tensor) -> torch.Tensor:
    """One time for the whole batch -> [B] float32 on x's device."""
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=torch.float32)


# Below this the input is pure noise for any image: the linear schedule ends here, and
# Lu et al. cut the cosine schedule (log SNR about -20 at its end) near here (T = 0.9946).
LOG_SNR_FLOOR = -10.0


def log_snr_steps(objective: EpsilonObjective, steps: int) -> list[int]:
    """`steps` distinct integer steps from the last (pure noise) to 0, uniform in logSNR.

    Lu et al.'s "logSNR" spacing, snapped to the trained integer steps; the first step is
    always the last trained one, the others spread from LOG_SNR_FLOOR up. Where one step
    spans more logSNR than the spacing (near step 0; near the end of the cosine schedule),
    neighbours are pushed apart so that every step is distinct.
    """
    if not 1 <= steps <= objective.num_steps:
        raise ValueError(f"steps must be in 1..{objective.num_steps}, got {steps}")
    abar = objective.alphas_cumprod  # [T] fp64, decreasing
    log_snr = torch.log(abar / (1 - abar))  # [T], decreasing in the step
    start = max(log_snr[-1].item(), LOG_SNR_FLOOR)
    targets = torch.linspace(start, log_snr[0].item(), steps, dtype=torch.float64)
    grid = [int((log_snr - target).abs().argmin()) for target in targets]
    for i in range(len(grid) - 2, -1, -1):  # distinct near step 0 ...
        grid[i] = max(grid[i], grid[i + 1] + 1)
    grid[0] = objective.num_steps - 1
    for i in range(1, len(grid)):  # ... and still within the trained steps at the top
        grid[i] = min(grid[i], grid[i - 1] - 1)
    return grid


def _alpha_sigma(objective: EpsilonObjective, step: int | None) -> tuple[float, float]:
    """(sqrt(abar), sqrt(1 - abar)) at a step; None means clean data (abar = 1)."""
    if step is None:
        return 1.0, 0.0
    alpha, sigma = objective.alpha_sigma(torch.tensor([step]))
    return alpha.item(), sigma.item()


def ddim(denoiser: Denoiser, objective: EpsilonObjective, noise: torch.Tensor, steps: int,
         *, eta: float = 0.0, generator: torch.Generator | None = None,
         progress: bool = False) -> torch.Tensor:
    """DDIM; eta = 0 is the deterministic ODE solver, eta = 1 ancestral DDPM-like sampling."""
    x = noise.float()
    grid = log_snr_steps(objective, steps)
    for step, next_step in tqdm(list(zip(grid, grid[1:] + [None])), disable=not progress):
        alpha, sigma = _alpha_sigma(objective, step)
        alpha_next, sigma_next = _alpha_sigma(objective, next_step)
        eps = denoiser(x, _batch_time(step, x)).float()
        x0 = (x - sigma * eps) / alpha
        # Song et al. eq. 16: the fresh-noise share of sigma_next.
        noise_std = eta * (sigma_next / sigma) * (1 - (alpha / alpha_next) ** 2) ** 0.5
        x = alpha_next * x0 + max(sigma_next**2 - noise_std**2, 0.0) ** 0.5 * eps
        if noise_std > 0:
            x = x + noise_std * torch.randn(x.shape, generator=generator, device=x.device)
    return x


def dpm_solver_pp(denoiser: Denoiser, objective: EpsilonObjective, noise: torch.Tensor,
                  steps: int, *, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) in data prediction (Lu et al. 2022, Algorithm 2).

    With lambda = log(alpha / sigma) and h = lambda_next - lambda:
        x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D,
    where D = x0 at the first step and otherwise the multistep correction
        D = (1 + 1 / (2r)) x0 - 1 / (2r) x0_prev,  r = h_prev / h.
    The last step lands on sigma = 0 (h infinite) and takes D = x0, as is standard.
    """
    x = noise.float()
    grid = log_snr_steps(objective, steps)
    x0_prev, h_prev = None, None
    for step, next_step in tqdm(list(zip(grid, grid[1:] + [None])), disable=not progress):
        alpha, sigma = _alpha_sigma(objective, step)
        eps = denoiser(x, _batch_time(step, x)).float()
        x0 = (x - sigma * eps) / alpha
        if next_step is None:
            return x0
        alpha_next, sigma_next = _alpha_sigma(objective, next_step)
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def _flow_grid(steps: int) -> list[float]:
    """steps + 1 times, evenly spaced, from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def _velocity(denoiser: Denoiser, objective: FlowObjective, x: torch.Tensor,
              t: float) -> torch.Tensor:
    return denoiser(x, objective.network_time(_batch_time(t, x))).float()


def euler(denoiser: Denoiser, objective: FlowObjective, noise: torch.Tensor, steps: int,
          *, progress: bool = False) -> torch.Tensor:
    """Explicit Euler on dx/dt = v from t = 1 to t = 0."""
    x = noise.float()
    grid = _flow_grid(steps)
    for t, t_next in tqdm(list(zip(grid, grid[1:])), disable=not progress):
        x = x + (t_next - t) * _velocity(denoiser, objective, x, t)
    return x


def heun(denoiser: Denoiser, objective: FlowObjective, noise: torch.Tensor, steps: int,
         *, progress: bool = False) -> torch.Tensor:
    """Heun's 2nd-order method (EDM Algorithm 1): Euler, then average the two slopes.

    The last step, onto t = 0, stays Euler as in EDM: 2 * steps - 1 network calls.
    """
    x = noise.float()
    grid = _flow_grid(steps)
    for t, t_next in tqdm(list(zip(grid, grid[1:])), disable=not progress):
        v = _velocity(denoiser, objective, x, t)
        x_euler = x + (t_next - t) * v
        if t_next == 0.0:
            x = x_euler
        else:
            v_next = _velocity(denoiser, objective, x_euler, t_next)
            x = x + (t_next - t) * 0.5 * (v + v_next)
    return x


_BY_NAME = {"ddim": ddim, "dpmpp": dpm_solver_pp, "euler": euler, "heun": heun}
# objective -> {solver name: solver}, from the config's one table of which solver fits which objective
SOLVERS = {objective: {name: _BY_NAME[name] for name in names} for objective, names in SOLVERS_FOR_OBJECTIVE.items()}


def sample(objective_name: str, solver_name: str, guided: Denoiser, objective: Objective,
           noise: torch.Tensor, steps: int, progress: bool = False) -> torch.Tensor:
    """noise [B, C, H, W] -> samples [B, C, H, W] fp32 with the named solver."""
    if objective_name not in SOLVERS:
        raise ValueError(f"objective={objective_name!r}; allowed: {', '.join(SOLVERS)}")
    if objective.name != objective_name:
        raise ValueError(
            f"objective={objective_name!r} but the objective object is {objective.name!r}"
        )
    fitting = SOLVERS[objective_name]
    if solver_name not in fitting:
        raise ValueError(
            f"solver={solver_name!r} does not fit objective {objective_name!r}; "
            f"allowed for {objective_name}: {', '.join(fitting)}"
        )
    return fitting[solver_name](guided, objective, noise, steps, progress=progress)
