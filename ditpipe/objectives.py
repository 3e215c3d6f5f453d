"""Training objectives: what the denoiser sees and what it must predict.

Both put timesteps on the 0..1000 scale the models embed. Each also names the diffusers scheduler
that samples from a model trained with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ditpipe.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


class DDPM:
    """Epsilon prediction on DiT's schedule: linear betas 1e-4..0.02 over 1000 steps."""

    name = "ddpm"

    def __init__(self) -> None:
        self.scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear",
                                       beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t.long().to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise


class RectifiedFlow:
    """Velocity on the straight path x_t = (1 - s) x0 + s noise; s ~ logit-normal(0, 1) as in SD3."""

    name = "rectified_flow"

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
        return torch.sigmoid(u) * NUM_TRAIN_TIMESTEPS

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.to(x0.device, x0.dtype) / NUM_TRAIN_TIMESTEPS).view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0


OBJECTIVES: dict[str, Callable[[], DDPM | RectifiedFlow]] = {"ddpm": DDPM, "rectified_flow": RectifiedFlow}


def build_objective(name: str, logit_mean: float = 0.0, logit_std: float = 1.0) -> DDPM | RectifiedFlow:
    """The objective ``name``; ``logit_mean``/``logit_std`` place rectified flow's training timesteps."""
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    return RectifiedFlow(logit_mean, logit_std) if name == "rectified_flow" else OBJECTIVES[name]()
