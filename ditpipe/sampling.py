"""Sampling: classifier-free guidance over diffusers schedulers, batched, reproducible per sample.

Needs only the models and the objectives. A sampler is a diffusers scheduler configured like the
objective the model was trained with: ``rectified_flow`` runs sample with flow-matching Euler or Heun,
``ddpm`` runs with DDPM, DDIM or DPM-Solver++ on the training betas. Every sample draws its starting
noise (and, for stochastic samplers, its step noise) from its own CPU generator seeded with its own
seed, so an image depends on its seed and prompt only: not on the batch it was drawn in, nor the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from ditpipe.errors import ConfigError
from ditpipe.models import Denoiser, trim_padding
from ditpipe.objectives import build_objective


def _euler(base: SchedulerMixin) -> SchedulerMixin:
    return FlowMatchEulerDiscreteScheduler.from_config(base.config)


def _heun(base: SchedulerMixin) -> SchedulerMixin:
    return FlowMatchHeunDiscreteScheduler.from_config(base.config)


# Latents are scaled to unit variance, not to [-1, 1]: never clip the predicted sample. "trailing"
# spacing starts at the last training step, which few-step DDPM/DDIM sampling needs (Lin et al. 2024);
# DDIM's last step then lands on the clean sample (alpha 1), not on timestep 0's slightly noisy one.
def _ddpm(base: SchedulerMixin) -> SchedulerMixin:
    return DDPMScheduler.from_config(base.config, clip_sample=False, timestep_spacing="trailing")


def _ddim(base: SchedulerMixin) -> SchedulerMixin:
    return DDIMScheduler.from_config(base.config, clip_sample=False, set_alpha_to_one=True,
                                     timestep_spacing="trailing")


def _dpmpp(base: SchedulerMixin) -> SchedulerMixin:
    return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++", solver_order=2,
                                                   timestep_spacing="trailing")


@dataclass(frozen=True)
class Sampler:
    objective: str  # the training objective this sampler solves
    make: Callable[[SchedulerMixin], SchedulerMixin]  # from the objective's training scheduler
    stochastic: bool
    help: str


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("rectified_flow", _euler, False, "flow-matching Euler (FlowMatchEulerDiscreteScheduler)"),
    "heun": Sampler("rectified_flow", _heun, False, "flow-matching Heun, 2 model calls per step"),
    "ddpm": Sampler("ddpm", _ddpm, True, "ancestral DDPM (stochastic)"),
    "ddim": Sampler("ddpm", _ddim, False, "DDIM, eta 0 (deterministic)"),
    "dpmpp": Sampler("ddpm", _dpmpp, False, "DPM-Solver++ 2M"),
}
DEFAULT_SAMPLER = {"rectified_flow": "euler", "ddpm": "dpmpp"}


def resolve_sampler(name: str, objective: str, key: str = "evaluate.sampler") -> str:
    """``auto`` to the objective's default; otherwise check that ``name`` solves ``objective``."""
    if name == "auto":
        return DEFAULT_SAMPLER[objective]
    if name not in SAMPLERS:
        raise ConfigError(f"{key} must be auto or one of {', '.join(SAMPLERS)}; got {name!r}")
    if SAMPLERS[name].objective != objective:
        fits = [n for n, s in SAMPLERS.items() if s.objective == objective]
        raise ConfigError(f"{key}={name} samples {SAMPLERS[name].objective} models; this run was trained with "
                          f"{objective}: use one of {', '.join(fits)}")
    return name


def build_scheduler(name: str, objective: str) -> SchedulerMixin:
    """A fresh scheduler for sampler ``name`` (or ``auto``) on a model trained with ``objective``."""
    name = resolve_sampler(name, objective)
    return SAMPLERS[name].make(build_objective(objective).scheduler)


@dataclass
class Conditioning:
    """Caption embeddings of a batch of prompts, as the text stage stores them."""

    emb: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L)
    pooled: torch.Tensor  # (N, D)

    def __len__(self) -> int:
        return self.emb.shape[0]

    def select(self, idx: slice | list[int]) -> Conditioning:
        return Conditioning(self.emb[idx], self.mask[idx], self.pooled[idx])

    def to(self, device: torch.device) -> Conditioning:
        return Conditioning(self.emb.to(device).float(), self.mask.to(device).long(), self.pooled.to(device).float())

    @staticmethod
    def repeat(one: dict[str, torch.Tensor], n: int) -> Conditioning:
        """``n`` copies of one caption's embedding (the empty caption, for the unconditional branch)."""
        return Conditioning(one["emb"].expand(n, *one["emb"].shape[-2:]), one["mask"].expand(n, -1),
                            one["pooled"].expand(n, -1))


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) standard normal noise; row i depends only on seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def guided(model: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
           guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g * (cond - uncond), in one batched forward pass."""
    n = x.shape[0]
    if guidance_scale == 1.0:
        return model(x, t.expand(n), cond.emb, cond.mask, cond.pooled).float()
    both = model(torch.cat([x, x]), t.expand(2 * n), torch.cat([cond.emb, uncond.emb]),
                 torch.cat([cond.mask, uncond.mask]), torch.cat([cond.pooled, uncond.pooled])).float()
    c, u = both.chunk(2)
    return u + guidance_scale * (c - u)


@torch.no_grad()
def sample_batch(model: Denoiser, scheduler: SchedulerMixin, cond: Conditioning, empty: dict[str, torch.Tensor],
                 seeds: list[int], latent_shape: tuple[int, int, int], steps: int, guidance_scale: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Denoiser-space latents (N, C, h, w) for one batch of prompts, on the model's device."""
    device = next(model.parameters()).device
    uncond = Conditioning.repeat(empty, len(cond))
    both = trim_padding(torch.cat([cond.emb, uncond.emb]), torch.cat([cond.mask, uncond.mask]))
    n = len(cond)
    cond = Conditioning(both[0][:n], both[1][:n], cond.pooled).to(device)
    uncond = Conditioning(both[0][n:], both[1][n:], uncond.pooled).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = initial_noise(seeds, latent_shape).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    gens = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]  # step noise of stochastic samplers
    use_autocast = dtype != torch.float32
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            pred = guided(model, model_in, t.reshape(1).to(device), cond, uncond, guidance_scale)
        x = scheduler.step(pred, t, x, generator=gens).prev_sample
    return x.float()


def sample(model: Denoiser, scheduler: SchedulerMixin, cond: Conditioning, empty: dict[str, torch.Tensor],
           seeds: list[int], latent_shape: tuple[int, int, int], *, steps: int, guidance_scale: float,
           batch_size: int = 64, dtype: torch.dtype = torch.float32, progress: str | None = None) -> torch.Tensor:
    """Latents for every prompt in ``cond`` (seeds[i] for prompt i), ``batch_size`` prompts at a time; on the CPU."""
    if len(seeds) != len(cond):
        raise ValueError(f"{len(seeds)} seeds for {len(cond)} prompts")
    out = []
    bar = tqdm(total=len(cond), desc=progress or "sample", unit="img", disable=None if progress else True)
    for start in range(0, len(cond), batch_size):
        idx = slice(start, start + batch_size)
        out.append(sample_batch(model, scheduler, cond.select(idx), empty, seeds[idx], latent_shape, steps,
                                guidance_scale, dtype).cpu())
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out) if out else torch.empty(0, *latent_shape)
