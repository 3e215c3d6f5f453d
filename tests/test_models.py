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


def _perturbed_dit_with_tokens() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("dit", "T/2", SPEC, tokens=True)
    for p in model.parameters():  # zero-initialised gates and projections: perturb so every path matters
        p.data += 0.05 * torch.randn_like(p)
    return model.eval()


def test_dit_with_tokens_reads_word_order_not_only_the_pooled_vector():
    model = _perturbed_dit_with_tokens()
    x, t, pooled = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 32)
    emb, mask = torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.long)
    swapped = emb[:, [0, 4, 2, 3, 1, 5]]  # same words, same pooled vector, another order
    with torch.no_grad():
        assert not torch.allclose(model(x, t, emb, mask, pooled), model(x, t, swapped, mask, pooled))
        plain = build_model("dit", "T/2", SPEC).eval()  # without tokens only the pooled vector counts
        torch.testing.assert_close(plain(x, t, emb, mask, pooled), plain(x, t, swapped, mask, pooled))


def test_dit_with_tokens_ignores_padding_and_batch_company():
    model = _perturbed_dit_with_tokens()
    x, t, pooled = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0]), torch.randn(2, 32)
    emb, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)
    mask[0, 3:] = 0
    with torch.no_grad():
        both = model(x, t, emb, mask, pooled)
        alone = model(x[:1], t[:1], emb[:1, :3], mask[:1, :3], pooled[:1])  # no padding at all
        junk = emb.clone()
        junk[0, 3:] = 100.0  # what padding positions hold must not matter
        torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, t, junk, mask, pooled), both)
        empty = torch.zeros(1, 8, dtype=torch.long)  # a caption with no token at all still gives numbers
        assert torch.isfinite(model(x[:1], t[:1], emb[:1], empty, pooled[:1])).all()


def test_dit_with_tokens_loads_back_as_trained(tmp_path):
    from ditpipe.models import RunInfo, load_denoiser

    model = _perturbed_dit_with_tokens()
    model.inner.save_pretrained(tmp_path)
    RunInfo(arch="dit", size="T/2", objective="rectified_flow", step=1, spec=SPEC, latents={}, text={},
            parameters=count_parameters(model), shards="", shards_index_sha256="").write(tmp_path)
    again, _ = load_denoiser(tmp_path)
    x, t, pooled = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 32)
    emb, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, emb, mask, pooled), again(x, t, emb, mask, pooled))
    assert again.inner.config.cross_attention


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
