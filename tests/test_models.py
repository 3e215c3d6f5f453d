import pytest
import torch

from ditpipe.errors import ConfigError
from ditpipe.models import ARCHS, DiT, Spec, build_model, count_parameters, preset_table

PAPER = {"S/2": (33.0, 6.06), "B/2": (130.5, 23.01), "L/2": (458.1, 80.71), "XL/2": (675.1, 118.64)}


def test_dit_presets_match_the_paper_within_1_percent():
    spec = Spec(latent_channels=4, latent_size=32, text_dim=0, num_classes=1000, learn_sigma=True)
    rows = {r["size"]: r for r in preset_table(spec, ("dit",))}
    for size, (params_m, gflops) in PAPER.items():
        assert rows[size]["params_m"] == pytest.approx(params_m, rel=0.01), size
        assert rows[size]["gflops"] == pytest.approx(gflops, rel=0.01), size


def test_diffusers_dit_would_not_match():
    """Why we keep our own DiT: diffusers' copies the conditioning embedder into every block."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        theirs = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                       out_channels=8, num_layers=28, sample_size=32, patch_size=2)
    assert count_parameters(theirs) / 1e6 > 1.05 * 675.1


SPEC = Spec(latent_channels=4, latent_size=8, text_dim=32)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_maps_noisy_latents_to_a_prediction_and_learns(arch):
    torch.manual_seed(0)
    model = build_model(arch, "T/2", SPEC)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 400.0, 999.0])
    emb, mask, pooled = torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.long), torch.randn(3, 32)
    mask[0, 3:] = 0
    out = model(x, t, emb, mask, pooled)
    assert out.shape == x.shape
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x, t, emb, mask, pooled), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["dit", "cross"])
def test_caption_changes_the_output(arch):
    torch.manual_seed(0)
    model = build_model(arch, "T/2", SPEC)
    for p in model.parameters():  # adaLN-Zero starts at the identity: perturb so conditioning matters
        p.data += 0.05 * torch.randn_like(p)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    mask = torch.ones(1, 6, dtype=torch.long)
    a = model(x, t, torch.randn(1, 6, 32), mask, torch.randn(1, 32))
    b = model(x, t, torch.randn(1, 6, 32), mask, torch.randn(1, 32))
    assert not torch.allclose(a, b)


def test_dit_save_pretrained_roundtrip_and_gradient_checkpointing(tmp_path):
    model = build_model("dit", "T/2", SPEC)
    model.inner.save_pretrained(tmp_path)
    again = DiT.from_pretrained(tmp_path)
    x, t, pooled = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 32)
    torch.testing.assert_close(model.inner(x, t, pooled=pooled), again(x, t, pooled=pooled))
    model.enable_gradient_checkpointing()
    model(x, t, None, None, pooled).sum().backward()
    assert model.inner.blocks[0].attn.qkv.weight.grad is not None


def test_bad_sizes_are_named():
    with pytest.raises(ConfigError, match="model.size must be PRESET/PATCH"):
        build_model("dit", "M/2", SPEC)
    with pytest.raises(ConfigError, match="patch 8 does not divide the 4px latent"):
        build_model("dit", "T/8", Spec(4, 4, 32))
    with pytest.raises(ConfigError, match="model.arch must be one of"):
        build_model("vit", "T/2", SPEC)


def test_models_command_prints_the_paper_table(cli, tmp_path):
    out = cli("models", "--class-conditional", cwd=tmp_path).stdout
    assert "XL/2" in out and "675.13M" in out and "118.6" in out
    out = cli("models", "--resolution", "32", "--downsample", "4", "--arch", "cross", cwd=tmp_path).stdout
    assert "cross  XS/2" in out and "mmdit" not in out
