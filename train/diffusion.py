"""Training objectives: what noise is added, what the network predicts, and the loss.

Two objectives, picked by name in the config:

- "eps": DDPM epsilon prediction (Ho et al. 2020) over 1000 discrete steps with the
  "linear" (beta 1e-4..0.02, as in DiT and PixArt) or "cosine" (Nichol & Dhariwal 2021)
  schedule. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the target is eps.
- "flow": rectified flow (Liu et al. 2022; SD3, Esser et al. 2024). t in [0, 1] is drawn
  logit-normal (SD3's default, mean 0, std 1) or uniform; x_t = (1 - t) x0 + t eps; the
  target is the velocity v = eps - x0, so dx_t/dt = v.

Both feed the network's timestep embedder the same 0..1000 range: eps gives the integer
step as a float, flow gives t * 1000 (`network_time`). The solvers in `sample/solvers.py`
use `alphas_cumprod` (eps) and `network_time` (flow), nothing else.

Random draws use the caller's generator, which must live on x0's device (torch's rule).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NUM_TRAIN_STEPS = 1000  # DDPM steps; also the scale of the network's timestep input
SCHEDULES = ("linear", "cosine")
TIME_SAMPLINGS = ("logit_normal", "uniform")


class Objective(ABC):
    """A diffusion training objective: noising, network input time and regression target."""

    name: str

    @abstractmethod
    def sample_training(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0 [B, C, H, W] -> (x_t [B, C, H, W], t_net [B] float, target [B, C, H, W])."""

    @abstractmethod
    def at_times(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training's noising at given times t [B] in (0, 1) and noise [B, C, H, W] (no draws)."""

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error in fp32, whatever precision the network ran in."""
        return F.mse_loss(prediction.float(), target.float())


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1] (as many singleton dims as `like` needs), fp32 on like's device."""
    return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


def linear_alphas_cumprod(num_steps: int) -> torch.Tensor:
    """DDPM's linear betas 1e-4..0.02 (scaled to 1000 steps) -> abar [num_steps], fp64."""
    scale = 1000 / num_steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_alphas_cumprod(num_steps: int, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine abar, with betas clipped at 0.999 as in their code."""
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class EpsilonObjective(Objective):
    """DDPM epsilon prediction over `num_steps` discrete steps."""

    schedule: str = "linear"
    num_steps: int = NUM_TRAIN_STEPS
    name: str = field(default="eps", init=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)  # [num_steps] fp64, CPU

    def __post_init__(self) -> None:
        builders = {"linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod}
        if self.schedule not in builders:
            raise ValueError(
                f"eps objective: schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}"
            )
        self.alphas_cumprod = builders[self.schedule](self.num_steps)

    def alpha_sigma(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer steps [B] -> (sqrt(abar), sqrt(1 - abar)), each [B] fp64 on CPU."""
        abar = self.alphas_cumprod[steps.long().cpu()]
        return abar.sqrt(), (1 - abar).sqrt()

    def at_times(self, x0, t, noise):
        """Fixed draws: t [B] in (0, 1) -> the step round(t * num_steps); as sample_training."""
        steps = (t * self.num_steps).round().clamp(0, self.num_steps - 1).long()
        alpha, sigma = self.alpha_sigma(steps)
        x_t = _per_sample(alpha, x0) * x0.float() + _per_sample(sigma, x0) * noise
        return x_t, steps.float(), noise

    def sample_training(self, x0, generator=None):
        steps = torch.randint(
            0, self.num_steps, (x0.shape[0],), generator=generator, device=x0.device
        )  # [B]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        alpha, sigma = self.alpha_sigma(steps)
        x_t = _per_sample(alpha, x0) * x0.float() + _per_sample(sigma, x0) * noise
        return x_t, steps.float(), noise


@dataclass
class FlowObjective(Objective):
    """Rectified flow: straight paths from data (t = 0) to noise (t = 1), velocity target."""

    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    high_t_share: float = 0.0  # this share of the draws replaced by t ~ U(high_t_from, 1)
    high_t_from: float = 0.9
    name: str = field(default="flow", init=False)

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"flow objective: time_sampling={self.time_sampling!r}; "
                f"allowed: {', '.join(TIME_SAMPLINGS)}"
            )
        if self.logit_std <= 0:
            raise ValueError(f"flow objective: logit_std must be > 0, got {self.logit_std}")
        if not 0.0 <= self.high_t_share <= 1.0 or not 0.0 <= self.high_t_from < 1.0:
            raise ValueError(f"flow objective: high_t_share must be in [0, 1] and high_t_from in [0, 1), "
                             f"got {self.high_t_share} and {self.high_t_from}")

    @staticmethod
    def network_time(t: torch.Tensor) -> torch.Tensor:
        """t in [0, 1] -> the network's timestep input in [0, 1000], like eps's steps."""
        return t.float() * NUM_TRAIN_STEPS

    def sample_time(self, batch: int, device, generator=None) -> torch.Tensor:
        """[B] times in (0, 1): logit-normal puts most weight on the middle (SD3, sec. 3.1).
        With high_t_share > 0, that share of them is drawn again from U(high_t_from, 1): the
        nearly pure noise where a model must place objects from the caption alone, which the
        logit-normal seldom draws (4% above 0.9 at (0.8, 0.8)). At 0 the draws are unchanged."""
        if self.time_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=device)
        else:
            normal = torch.randn(batch, generator=generator, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        if self.high_t_share > 0:
            picked = torch.rand(batch, generator=generator, device=device) < self.high_t_share
            high = self.high_t_from + (1 - self.high_t_from) * torch.rand(batch, generator=generator, device=device)
            t = torch.where(picked, high, t)
        return t

    def at_times(self, x0, t, noise):
        """Fixed draws: t [B] in (0, 1) and the noise given; as sample_training."""
        x0 = x0.float()
        x_t = (1 - _per_sample(t, x0)) * x0 + _per_sample(t, x0) * noise
        return x_t, self.network_time(t), noise - x0

    def sample_training(self, x0, generator=None):
        t = self.sample_time(x0.shape[0], x0.device, generator)  # [B]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return self.at_times(x0, t, noise)


SAMPLE_PREDICTION_MIN_T = 0.05  # JiT's clip of the time in the x0 -> v division (t = 0 is data here)


def velocity_from_sample(x_t: torch.Tensor, x0: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
    """The flow velocity a predicted clean image implies: x_t = (1 - t) x0 + t eps gives
    v = eps - x0 = (x_t - x0) / t. x_t, x0 [B, C, H, W]; t_net [B] the network's time (0..1000),
    clamped at SAMPLE_PREDICTION_MIN_T near the data, as JiT. Computed in fp32, returned in x0's dtype."""
    t = (t_net.float() / NUM_TRAIN_STEPS).clamp(min=SAMPLE_PREDICTION_MIN_T)  # [B]
    return ((x_t.float() - x0.float()) / _per_sample(t, x0)).to(x0.dtype)


OBJECTIVES = {"eps": EpsilonObjective, "flow": FlowObjective}


def objective_from_config(train) -> Objective:
    """The objective a TrainConfig names, with the option that applies to it."""
    if train.objective == "flow":
        return make_objective("flow", time_sampling=train.time_sampling, logit_mean=train.logit_mean,
                              logit_std=train.logit_std, high_t_share=train.high_t_share,
                              high_t_from=train.high_t_from)
    return make_objective(train.objective, schedule=train.schedule)


def make_objective(name: str, **options) -> Objective:
    """Build an objective by config name; options go to its dataclass (e.g. schedule=)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r}; allowed: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    allowed = [f.name for f in cls.__dataclass_fields__.values() if f.init]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"objective {name!r}: unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    return cls(**options)
