import pytest
import torch

import ditpipe.optim
from ditpipe.config import TrainConfig
from ditpipe.errors import ConfigError
from ditpipe.io import read_jsonl
from ditpipe.models import ARCHS, Spec, build_model
from ditpipe.optim import CAPTION_PROJECTIONS, OPTIMIZERS, MuonAdamW, hidden_matrices, orthogonalize, orthogonalize_all
from tests.test_train import train


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (48, 48)])
def test_orthogonalize_flattens_the_singular_values(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    g = u @ torch.diag(torch.logspace(-1.5, 0, k)) @ v.T  # singular values over 1.5 decades
    s = torch.linalg.svdvals(orthogonalize(g))
    assert 0.5 < s.min() and s.max() < 1.3, s  # Newton-Schulz leaves them near 1, not exactly 1
    torch.testing.assert_close(orthogonalize(3 * g), orthogonalize(g), rtol=0, atol=1e-4)  # nor is its size


def plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration one matrix at a time, in float64: the reference."""
    a, b, c = ditpipe.optim.NS_COEFFICIENTS
    x = g.double()
    x = x.T if g.shape[0] > g.shape[1] else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if g.shape[0] > g.shape[1] else x).float()


def test_the_gram_form_and_batches_give_the_plain_iteration():
    """Wide matrices iterate on their Gram matrix and same-shape matrices in one batch: the result is the plain
    per-matrix iteration's, for ill-conditioned and low-rank gradients too."""
    torch.manual_seed(0)
    shapes = [(128, 512), (512, 128), (128, 512), (64, 192), (48, 48), (96, 128), (96, 128), (128, 96)]
    gs = [torch.randn(s) * torch.rand(s[1]) ** 4 for s in shapes]  # column scales over decades
    gs += [torch.randn(128, 4) @ torch.randn(4, 256) + 0.01 * torch.randn(128, 256) for _ in range(2)]  # rank 4
    assert sum(ditpipe.optim._gram_form(g.new_empty(1, *sorted(g.shape))) for g in gs) == 6
    for g, fast in zip(gs, orthogonalize_all(gs), strict=True):
        plain = plain_newton_schulz(g)
        assert fast.shape == g.shape and fast.dtype == g.dtype
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="at least one step, got 0"):
        orthogonalize(gs[0], steps=0)


def test_gram_form_on_a_cpu_only_even_with_tf32_on():
    """Under TF32 (CUDA training turns it on) the Gram form's rounding adds up: off a CPU it takes the plain form.
    A CPU's float32 matmuls stay exact with TF32 on, so there it keeps the Gram form."""
    x = torch.randn(1, 8, 32)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py does
        assert ditpipe.optim._gram_form(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert not ditpipe.optim._gram_form(x.to("meta")) and not ditpipe.optim._gram_form(x[:, :, :15])


def test_the_adamw_half_is_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(7, 3))
    theirs.data.copy_(ours.data)
    a = MuonAdamW([], [ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999))
    for _ in range(5):
        g = torch.randn(7, 3)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.data, theirs.data, rtol=0, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is in torch >= 2.9")
@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_the_muon_half_steps_as_torch_muon(shape):
    """The same update as torch.optim.Muon's, up to its bfloat16 Newton-Schulz (ours runs it in float32)."""
    torch.manual_seed(0)
    start = torch.randn(*shape)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    a = MuonAdamW([ours], [], lr=1e-2, weight_decay=0.1)
    b = torch.optim.Muon([theirs], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(*shape)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    da, db = (ours.data - start).flatten(), (theirs.data - start).flatten()
    assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.99
    assert abs(da.norm() / db.norm() - 1) < 0.05
    assert da.norm() > 0.01  # it moved: 3 steps of RMS about 0.2 x lr x sqrt(96) per element


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_gives_muon_only_linear_weights_inside_blocks_or_caption_projections(arch):
    model = build_model(arch, "T/2", Spec(latent_channels=4, latent_size=8, text_dim=32))
    matrices, others = hidden_matrices(model)
    owner = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert matrices and all(id(p) in owner for p in matrices)
    kinds = {"block" if "block" in owner[id(p)] else next(k for k in CAPTION_PROJECTIONS if k in owner[id(p)])
             for p in matrices}  # StopIteration for a matrix of neither kind
    assert "block" in kinds and (arch == "unet") == (kinds == {"block"})  # the U-Net reads the raw tokens
    plain, _ = hidden_matrices(model, captions=False)
    assert plain and all("block" in owner[id(p)] for p in plain)
    assert len(plain) < len(matrices) or arch == "unet"
    assert len(matrices) + len(others) == sum(p.requires_grad for p in model.parameters())
    tables = [n for n, p in model.named_parameters() if n.endswith("scale_shift_table")]
    assert (arch == "cross") == bool(tables)  # PixArt's adaLN tables are 2-D but no layer's weight: AdamW's
    muon_ids = {id(p) for p in matrices}
    assert not any(id(p) in muon_ids for n, p in model.named_parameters() if n in tables)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = build_model("dit", "T/2", Spec(latent_channels=4, latent_size=8, text_dim=32), caption_layers=1)
    matrices, others = hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[1] for p in matrices} == {"blocks", "caption_blocks", "caption_embedder",
                                                              "text_embedder"}
    plain, _ = hidden_matrices(model, captions=False)  # train.muon_captions=false: AdamW for the projections
    assert {names[id(p)].split(".")[1] for p in plain} == {"blocks", "caption_blocks"}
    assert all(p.ndim == 2 for p in matrices)
    rest = {names[id(p)] for p in others}
    assert {"inner.x_embedder.weight", "inner.final_layer.linear.weight", "inner.t_embedder.mlp.0.weight"} <= rest
    assert len(matrices) + len(others) == sum(p.requires_grad for p in model.parameters())
    opt = OPTIMIZERS["muon"](model, 1e-3, 0.0)
    assert [g["muon"] for g in opt.param_groups] == [True, False]


def test_muon_with_fsdp_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"train\.optimizer=muon.*train\.fsdp"):
        TrainConfig(optimizer="muon", fsdp=True)


def test_a_muon_run_resumes_to_the_same_losses(tiny_shards, tmp_path):
    kw = {"arch": "dit", "optimizer": "muon", "checkpoint_every": 3, "lr_schedule": "constant"}  # one schedule for both
    train(tiny_shards, tmp_path / "straight", steps=6, **kw)
    train(tiny_shards, tmp_path / "split", steps=3, **kw)
    assert train(tiny_shards, tmp_path / "split", steps=6, **kw)["resumed_from"] == 3
    straight, split = ([(r["step"], r["loss"]) for r in read_jsonl(tmp_path / d / "metrics.jsonl")]
                       for d in ("straight", "split"))
    assert len(straight) == 6 and straight == split  # the momentum buffers came back with the checkpoint
    adamw = train(tiny_shards, tmp_path / "adamw", steps=6, **{**kw, "optimizer": "adamw"})
    assert adamw["resumed_from"] == 0
    assert [r["loss"] for r in read_jsonl(tmp_path / "adamw" / "metrics.jsonl")][-1] != straight[-1][1]
