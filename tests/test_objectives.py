import pytest
import torch

from ditpipe.errors import ConfigError
from ditpipe.objectives import DDPM, RectifiedFlow, build_objective


def test_ddpm_is_dits_linear_schedule_and_predicts_noise():
    obj = DDPM()
    betas = obj.scheduler.betas
    assert len(betas) == 1000 and betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = obj.sample_t(4, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 1000
    abar = obj.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(obj.noisy(x0, noise, t), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert obj.target(x0, noise, t) is noise


def test_rectified_flow_straight_path_and_velocity():
    obj = RectifiedFlow()
    t = obj.sample_t(20000, torch.Generator().manual_seed(0))
    s = t / 1000
    assert 0 < s.min() and s.max() < 1 and s.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ((s > 0.25) & (s < 0.75)).float().mean() > 0.6  # logit-normal: mass in the middle
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    tt = torch.tensor([0.0, 1000.0])
    xt = obj.noisy(x0, noise, tt)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(obj.target(x0, noise, tt), noise - x0)


def test_unknown_objective():
    with pytest.raises(ConfigError, match="train.objective must be one of ddpm, rectified_flow"):
        build_objective("edm")


def test_rectified_flow_timesteps_follow_the_logit_normal_params():
    """train.logit_mean moves training toward noisier (> 0) or cleaner (< 0) steps; the median is sigmoid(mean)."""
    g = torch.Generator().manual_seed(0)
    for mean in (-1.0, 0.0, 1.0):
        t = build_objective("rectified_flow", logit_mean=mean, logit_std=0.5).sample_t(20_000, g) / 1000
        assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(mean)).item(), abs=0.01)
        assert 0 < t.min() and t.max() < 1
    assert isinstance(build_objective("ddpm", logit_mean=3.0), DDPM)  # the DDPM objective has its own schedule


def test_logit_std_must_be_positive():
    from ditpipe.config import TrainConfig

    with pytest.raises(ConfigError, match="train.logit_std must be > 0, got 0"):
        TrainConfig(logit_std=0)
