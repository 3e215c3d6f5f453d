import pytest
import torch

from ditpipe.errors import ConfigError
from ditpipe.models import ARCHS, DiT, Spec, build_model, count_parameters, preset_table

PAPER = {"S/2": (33.0, 6.06), "B/2": (130.5, 23.01), "L/2": (458.1, 80.71), "XL/2": (675.1, 118.64)}


def test_dit_presets_match_the_paper_within_1_percent():
    spec = Spec(latent_channels=4, latent_size=32, text_dim=0, num_classes=1000, learn_sigma=True)
    rows = {r["size"]: r for r in preset_table(spec, ("dit",), mlp_conv=0)}
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
        plain = build_model("dit", "T/2", SPEC, tokens=False).eval()  # without tokens only the pooled vector counts
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


def test_trimming_caption_padding_changes_nothing_but_the_width():
    from ditpipe.models import trim_padding

    model = _perturbed_dit_with_tokens()
    x, t, pooled = torch.randn(3, 4, 8, 8), torch.tensor([300.0, 800.0, 50.0]), torch.randn(3, 32)
    emb, mask = torch.randn(3, 8, 32), torch.zeros(3, 8, dtype=torch.long)
    mask[0, :3], mask[1, :5] = 1, 1  # the third caption is all padding
    short, short_mask = trim_padding(emb, mask)
    assert short.shape == (3, 5, 32) and short_mask.shape == (3, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, short, short_mask, pooled), model(x, t, emb, mask, pooled),
                                   atol=1e-5, rtol=1e-5)
    assert trim_padding(emb, torch.zeros_like(mask))[0].shape == (3, 1, 32)  # nothing used: one column stays
    none = torch.zeros(1, 8, dtype=torch.long)  # no token at all: the caption speaks through its pooled vector only
    plain = build_model("dit", "T/2", SPEC, tokens=False).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1], t[:1], emb[:1], none, pooled[:1]),
                                   plain(x[:1], t[:1], emb[:1], none, pooled[:1]))


def test_caption_layers_read_the_words_together_and_ignore_padding(tmp_path):
    from ditpipe.models import RunInfo, load_denoiser, trim_padding

    torch.manual_seed(0)
    model = build_model("dit", "T/2", SPEC, caption_layers=2)
    assert len(model.inner.caption_blocks) == 2 and model.inner.config.caption_layers == 2
    x, t, pooled = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 32)
    emb, mask = torch.randn(2, 8, 32), torch.zeros(2, 8, dtype=torch.long)
    mask[0, :3], mask[1, :6] = 1, 1
    with torch.no_grad():  # the refiner starts as the identity: the same model without it, weight for weight
        plain = build_model("dit", "T/2", SPEC, caption_layers=0)
        plain.load_state_dict(model.state_dict(), strict=False)
        torch.testing.assert_close(model(x, t, emb, mask, pooled), plain(x, t, emb, mask, pooled))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    model.eval()
    junk = emb.clone()
    junk[mask == 0] = 100.0  # padding columns hold anything: the words' self-attention never reads them
    short, short_mask = trim_padding(emb, mask)
    with torch.no_grad():
        out = model(x, t, emb, mask, pooled)
        torch.testing.assert_close(model(x, t, junk, mask, pooled), out)
        torch.testing.assert_close(model(x, t, short, short_mask, pooled), out, atol=1e-5, rtol=1e-5)
        # each refined word depends on the others: change word 0 and word 1 moves
        ctx = model.inner.caption_embedder(emb)
        moved = emb.clone()
        moved[:, 0] += 1.0
        ctx_moved = model.inner.caption_embedder(moved)
        for block in model.inner.caption_blocks:
            ctx, ctx_moved = block(ctx, mask.bool()), block(ctx_moved, mask.bool())
        assert (ctx[:, 1] - ctx_moved[:, 1]).abs().max() > 1e-3
    model.inner.save_pretrained(tmp_path)
    RunInfo(arch="dit", size="T/2", objective="rectified_flow", step=1, spec=SPEC, latents={}, text={},
            parameters=count_parameters(model), shards="", shards_index_sha256="").write(tmp_path)
    again, _ = load_denoiser(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, emb, mask, pooled), out)
    with pytest.raises(ConfigError, match="caption_layers \\(2\\) refine caption tokens: needs cross_attention"):
        DiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=32,
            caption_layers=2)
    assert build_model("dit", "T/2", SPEC, tokens=False, caption_layers=2).inner.config.caption_layers == 0


def test_dit_cross_attention_needs_captions_and_mlp_conv_an_odd_kernel():
    with pytest.raises(ConfigError, match="cross_attention needs caption embeddings"):
        DiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, cross_attention=True)
    with pytest.raises(ConfigError, match="mlp_conv must be 0 or an odd kernel size, got 2"):
        DiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, mlp_conv=2)


def test_the_default_dit_reads_tokens_and_neighbours_and_the_bare_one_is_the_papers():
    from ditpipe.config import ModelConfig

    default = build_model("dit", "T/2", SPEC)  # build_model's defaults are params.yaml's
    assert default.inner.config.cross_attention == ModelConfig().tokens
    assert default.inner.config.mlp_conv == ModelConfig().mlp_conv == 3
    assert len(default.inner.caption_blocks) == ModelConfig().caption_layers == 2
    assert all(b.mlp_conv.kernel_size == (3, 3) and b.mlp_conv.groups == b.mlp_conv.in_channels
               for b in default.inner.blocks)
    bare = build_model("dit", "T/2", SPEC, tokens=False, mlp_conv=0)
    assert all(b.mlp_conv is None and b.cross_attn is None for b in bare.inner.blocks)
    assert not bare.inner.caption_blocks
    # the MLP of a block with the convolution mixes a 3x3 neighbourhood of tokens; the paper's mixes none
    for model, reach in ((default, {(i, j) for i in range(3) for j in range(3)}), (bare, {(1, 1)})):
        block = model.inner.blocks[0]
        x = torch.zeros(1, 16, block.mlp[0].in_features)  # a 4x4 token grid
        poked = x.clone()
        poked[0, 5] = 1.0  # token (1, 1)
        with torch.no_grad():
            moved = (block.feed_forward(poked) - block.feed_forward(x)).abs().sum(-1)[0].reshape(4, 4)
        assert {(i, j) for i in range(4) for j in range(4) if moved[i, j] > 1e-6} == reach


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
    model = build_model("dit", "T/2", SPEC, tokens=False)
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
    with_tokens = cli("models", "--resolution", "32", "--downsample", "2", "--arch", "dit", cwd=tmp_path).stdout
    pooled = cli("models", "--resolution", "32", "--downsample", "2", "--arch", "dit", "--no-tokens",
                 cwd=tmp_path).stdout
    row = [line.split() for line in with_tokens.splitlines() if line.startswith("dit    XXS/2")][0]
    row_pooled = [line.split() for line in pooled.splitlines() if line.startswith("dit    XXS/2")][0]
    assert float(row[3].rstrip("M")) > float(row_pooled[3].rstrip("M"))  # the default reads tokens: more weights
