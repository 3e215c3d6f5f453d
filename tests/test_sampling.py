"""Samplers: oracle models land on their targets, known trajectories, guidance, batching and seeds."""

import pytest
import torch

from ditpipe.config import SAMPLER_OBJECTIVES
from ditpipe.errors import ConfigError
from ditpipe.models import Spec, build_model
from ditpipe.objectives import build_objective
from ditpipe.sampling import SAMPLERS, Conditioning, build_scheduler, resolve_sampler, sample

TARGET = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
EMPTY = {"emb": torch.zeros(2, 8), "mask": torch.ones(2, dtype=torch.long), "pooled": torch.zeros(8)}


def cond(n: int = 3, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(n, 2, 8, generator=g), torch.ones(n, 2, dtype=torch.long),
                        torch.randn(n, 8, generator=g))


class Oracle(torch.nn.Module):
    """Predicts exactly what the objective's target would be for TARGET (prompt i -> TARGET[i % 3])."""

    def __init__(self, objective: str):
        super().__init__()
        self.objective = objective
        self.alphas = build_objective("ddpm").scheduler.alphas_cumprod
        self.w = torch.nn.Parameter(torch.zeros(()))  # a parameter, so the sampler finds the device

    def forward(self, x, t, emb, mask, pooled):
        x0 = TARGET.repeat(x.shape[0] // 3 + 1, 1, 1, 1)[: x.shape[0]]
        if self.objective == "rectified_flow":  # v = noise - x0 = (x_t - x0) / s
            return (x - x0) / (t / 1000).view(-1, 1, 1, 1)
        ab = self.alphas[t.long()].view(-1, 1, 1, 1)  # eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_model_that_predicts_the_right_target_samples_it(name):
    objective = SAMPLERS[name].objective
    for steps in (4, 25):
        out = sample(Oracle(objective), build_scheduler(name, objective), cond(), EMPTY, [0, 1, 2], (4, 4, 4),
                     steps=steps, guidance_scale=3.0)
        torch.testing.assert_close(out, TARGET, atol=1e-5, rtol=0)


def tiny_model(arch: str = "cross"):
    torch.manual_seed(0)
    return build_model(arch, "T/2", Spec(latent_channels=4, latent_size=4, text_dim=8)).eval()


def test_euler_follows_the_flow_ode_step_by_step():
    """Our CFG loop over FlowMatchEulerDiscreteScheduler = x += (s_next - s) * v with v guided, written out by hand."""
    model, c = tiny_model(), cond()
    out = sample(model, build_scheduler("euler", "rectified_flow"), c, EMPTY, [0, 1, 2], (4, 4, 4), steps=6,
                 guidance_scale=2.5)
    x = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1, 2)])
    sigmas = torch.cat([torch.linspace(1.0, 1 / 1000, 6), torch.zeros(1)])
    u = Conditioning.repeat(EMPTY, 3)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = (s * 1000).expand(3)
            vc = model(x, t, c.emb, c.mask.long(), c.pooled)
            vu = model(x, t, u.emb, u.mask.long(), u.pooled)
            x = x + (s_next - s) * (vu + 2.5 * (vc - vu))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-4)


def test_ddim_follows_the_deterministic_ddim_update():
    """DDIM (eta 0, trailing spacing, alpha 1 after the last step), written out from the paper's update."""
    model, c = tiny_model("dit"), cond()
    out = sample(model, build_scheduler("ddim", "ddpm"), c, EMPTY, [0, 1, 2], (4, 4, 4), steps=5, guidance_scale=1.0)
    ab = build_objective("ddpm").scheduler.alphas_cumprod
    ts = [999, 799, 599, 399, 199]
    x = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1, 2)])
    with torch.no_grad():
        for i, t in enumerate(ts):
            eps = model(x, torch.full((3,), t), c.emb, c.mask.long(), c.pooled)
            x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
            a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)


def test_heun_follows_the_predictor_corrector_update():
    """Flow-matching Heun: Euler predictor, trapezoid corrector; the last step (to sigma 0) is plain Euler."""
    model, c = tiny_model(), cond()
    out = sample(model, build_scheduler("heun", "rectified_flow"), c, EMPTY, [0, 1, 2], (4, 4, 4), steps=4,
                 guidance_scale=1.0)
    x = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1, 2)])
    sigmas = torch.cat([torch.linspace(1.0, 1 / 1000, 4), torch.zeros(1)])

    def v(x, s):
        return model(x, (s * 1000).expand(3), c.emb, c.mask.long(), c.pooled)

    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            d1, dt = v(x, s), s_next - s
            x = x + dt * d1 if s_next == 0 else x + dt * (d1 + v(x + dt * d1, s_next)) / 2
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-4)


def test_ddpm_follows_the_ancestral_posterior_with_per_image_noise():
    """DDPM: x_prev = posterior mean + sqrt(beta~) z, z drawn from each image's own step-noise generator."""
    model, c = tiny_model("dit"), cond()
    seeds = [0, 1, 2]
    out = sample(model, build_scheduler("ddpm", "ddpm"), c, EMPTY, seeds, (4, 4, 4), steps=5, guidance_scale=1.0)
    ab = build_objective("ddpm").scheduler.alphas_cumprod
    ts = [999, 799, 599, 399, 199]
    x = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    gens = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]
    with torch.no_grad():
        for i, t in enumerate(ts):
            a_t, a_prev = ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            beta = 1 - a_t / a_prev
            eps = model(x, torch.full((3,), t), c.emb, c.mask.long(), c.pooled)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x
            z = torch.cat([torch.randn(1, 4, 4, 4, generator=g) for g in gens])
            x = mean + ((1 - a_prev) / (1 - a_t) * beta).clamp_min(1e-20).sqrt() * z
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_an_image_depends_on_its_seed_and_prompt_not_its_batch(name):
    objective = SAMPLERS[name].objective
    model, c = tiny_model(), cond(5)
    seeds = [10, 11, 12, 13, 14]
    batched = sample(model, build_scheduler(name, objective), c, EMPTY, seeds, (4, 4, 4), steps=4,
                     guidance_scale=2.0, batch_size=5)
    one_by_one = sample(model, build_scheduler(name, objective), c, EMPTY, seeds, (4, 4, 4), steps=4,
                        guidance_scale=2.0, batch_size=1)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    other = sample(model, build_scheduler(name, objective), c, EMPTY, [99, 11, 12, 13, 14], (4, 4, 4), steps=4,
                   guidance_scale=2.0)
    assert not torch.allclose(other[0], batched[0]) and torch.allclose(other[1:], batched[1:], atol=1e-5)


def test_guidance_scale_one_is_the_conditional_model_and_higher_scales_move_away_from_unconditional():
    model, c = tiny_model(), cond()
    sched = build_scheduler("euler", "rectified_flow")
    g1 = sample(model, sched, c, EMPTY, [0, 1, 2], (4, 4, 4), steps=3, guidance_scale=1.0)
    g4 = sample(model, sched, c, EMPTY, [0, 1, 2], (4, 4, 4), steps=3, guidance_scale=4.0)
    uncond = sample(model, sched, Conditioning.repeat(EMPTY, 3), EMPTY, [0, 1, 2], (4, 4, 4), steps=3,
                    guidance_scale=1.0)
    assert (g4 - uncond).norm() > (g1 - uncond).norm() > 0


def test_samplers_check_the_objective_and_agree_with_the_config_table():
    assert {n: s.objective for n, s in SAMPLERS.items()} == SAMPLER_OBJECTIVES
    assert resolve_sampler("auto", "rectified_flow") == "euler" and resolve_sampler("auto", "ddpm") == "dpmpp"
    with pytest.raises(ConfigError, match="evaluate.sampler=ddim samples ddpm models.*euler, heun"):
        resolve_sampler("ddim", "rectified_flow")
    with pytest.raises(ConfigError, match="one of euler"):
        resolve_sampler("plms", "ddpm")


def test_reduced_precision_sampling_runs_under_autocast_and_stays_close():
    """evaluate.dtype=bfloat16 (the GPU default) runs the model under autocast; results stay near fp32's."""
    model, c = tiny_model(), cond()
    sched = build_scheduler("euler", "rectified_flow")
    full = sample(model, sched, c, EMPTY, [0, 1, 2], (4, 4, 4), steps=3, guidance_scale=2.0)
    half = sample(model, sched, c, EMPTY, [0, 1, 2], (4, 4, 4), steps=3, guidance_scale=2.0, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert (half - full).abs().max() < 0.1 * full.abs().max()
