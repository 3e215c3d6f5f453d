import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ditpipe.backbones import (
    DEFAULT_INCEPTION,
    InceptionFeatures,
    extract_features,
    inception_path,
    load_inception,
)
from ditpipe.data.shapes import generate
from ditpipe.errors import DitpipeError
from ditpipe.io import sha256_file
from ditpipe.metrics import clip_score, fid_kid

N_IMAGES = 32
NOISE_LEVELS = (6.0, 24.0)  # Gaussian pixel noise std on the 0..255 scale


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inception(threads) -> InceptionFeatures:
    return load_inception()


@pytest.fixture(scope="module")
def shape_features(inception) -> dict[str, torch.Tensor]:
    """Inception features of 32 shapes at 32px, clean and with two levels of noise (Inception runs ~5 img/s)."""
    images = [img for _, img, _, _ in generate(0, N_IMAGES, 32)]
    pixels = np.stack([np.asarray(img) for img in images]).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal(pixels.shape).astype(np.float32)
    feats = {"clean": extract_features(inception, images)}
    for sigma in NOISE_LEVELS:
        noisy = np.clip(pixels + sigma * noise, 0, 255).round().astype(np.uint8)
        feats[sigma] = extract_features(inception, list(noisy))
    return feats


# --- backbones -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_inception_loads_offline(inception, shape_features):
    path = inception_path(DEFAULT_INCEPTION)
    assert path.name == "default_1.pt" and inception.path == str(path)
    assert inception.identity == sha256_file(path)
    f = shape_features["clean"]
    assert f.shape == (N_IMAGES, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f >= 0).all() and f.abs().sum() > 0  # pool3 follows a ReLU: nonnegative, and not all zero


@pytest.mark.slow
def test_the_optimised_cpu_inception_gives_the_plain_files_features(inception, shape_features):
    """load_inception freezes and fuses the net on a CPU for speed; the features must be the file's own."""
    plain = InceptionFeatures(torch.jit.load(inception.path).eval(), inception.path, inception.identity)
    images = [img for _, img, _, _ in generate(0, 8, 32)]
    torch.testing.assert_close(extract_features(plain, images), shape_features["clean"][:8], rtol=1e-4, atol=1e-4)


def test_missing_or_broken_inception_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(DitpipeError, match=f"no Inception TorchScript file at {re.escape(str(missing))}.*fid-helper"):
        load_inception(str(missing))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not torchscript")
    with pytest.raises(DitpipeError, match=f"cannot load the Inception TorchScript file {re.escape(str(broken))}"):
        load_inception(str(broken))


class _Recorder(torch.nn.Module):
    """Stands in for the TorchScript net: remembers its input, returns 2048 features."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen = x
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


def test_inception_preprocessing_protocol():
    net = _Recorder()
    model = InceptionFeatures(net, "stub.pt", "id")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[0] = 255
    images[1, :, :, 4:] = 255
    out = model(images)
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and not out.requires_grad
    assert net.seen.shape == (2, 3, 299, 299)
    assert net.seen[0].min() == pytest.approx(127 / 128) and net.seen[0].max() == pytest.approx(127 / 128)
    assert net.seen[1, :, :, 0].max() == -1 and net.seen[1, :, :, -1].min() == pytest.approx(127 / 128)
    # bilinear: about one source pixel (~37 columns) of blend at the edge, and no overshoot as bicubic would ring
    row = net.seen[1, 0, 0]
    assert 20 < int(((row > -1) & (row < 127 / 128)).sum()) < 60
    assert row.min() >= -1 and row.max() <= 127 / 128 + 1e-6
    with pytest.raises(ValueError, match="uint8"):
        model(images.float())


class _MeanColour(torch.nn.Module):
    """A cheap backbone: per-channel mean and the image side, so tests can see what each image became."""

    num_features = 4

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4
        side = torch.full((len(x), 1), float(x.shape[-1]))
        return torch.cat([x.float().mean(dim=(2, 3)), side], dim=1)


def test_extract_features_accepts_pil_arrays_and_tensors():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    grey = Image.new("L", (4, 4), 100)  # other modes become RGB
    rgba = Image.new("RGBA", (6, 6), (0, 0, 200, 10))
    images = [red, grey, rgba, np.full((5, 5, 3), 7, np.uint8), red]
    f = extract_features(_MeanColour(), images, batch_size=2, progress="test")
    expected = [[255, 0, 0, 8], [100, 100, 100, 4], [0, 0, 200, 6], [7, 7, 7, 5], [255, 0, 0, 8]]
    assert f.dtype == torch.float32 and f.tolist() == expected  # mixed sizes come back in input order
    stacked = torch.stack([torch.from_numpy(np.array(red)).permute(2, 0, 1)] * 3)
    assert extract_features(_MeanColour(), stacked, batch_size=2).tolist() == [expected[0]] * 3
    with pytest.raises(ValueError, match="uint8"):
        extract_features(_MeanColour(), [np.zeros((4, 4, 3), np.float32)])


# --- FID / KID on real images --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fid_kid_zero_on_self_and_grow_with_noise(shape_features):
    clean = shape_features["clean"]
    same = fid_kid(clean, clean)
    low, high = (fid_kid(clean, shape_features[s]) for s in NOISE_LEVELS)
    # FID of a set with itself is exactly 0; what remains is float64 rounding in torchmetrics' eigvals (~1e-7)
    # against FIDs in the tens to hundreds here.
    assert abs(same["fid"]) < 1e-3
    assert 1.0 < low["fid"] < high["fid"]
    # KID's unbiased estimator on two identical sets is -2 (mean k_ii - mean k_ij) / (m - 1): <= 0 and O(1/m),
    # not exactly 0. It must stay small next to a real difference.
    assert same["kid"] <= 1e-12 and abs(same["kid"]) < 0.5 * low["kid"]
    assert 0 < low["kid"] < high["kid"]
    assert same["n_real"] == same["n_fake"] == same["kid_subset_size"] == N_IMAGES


# --- FID / KID on synthetic features ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, dim", [(400, 16), (64, 2048)])  # n >= D, and the usual n < D (a rotated basis inside)
def test_fid_closed_forms(n, dim):
    def fid(real, fake):
        return fid_kid(real, fake, kid_subsets=2)["fid"]  # few KID subsets: KID is not the subject here

    g = torch.Generator().manual_seed(0)
    real = torch.randn(n, dim, generator=g, dtype=torch.float64) + 1.0
    assert abs(fid(real, real)) < 1e-6
    # A shift leaves the sample covariance unchanged, so FID = ||c||^2 exactly.
    c = torch.linspace(-0.5, 0.5, dim, dtype=torch.float64)
    assert fid(real, real + c) == pytest.approx(float(c.square().sum()), rel=1e-6)
    # Doubling: mean 2mu, covariance 4S, sqrt(S 4S) = 2S, so FID = ||mu||^2 + tr(S): checks the covariance term.
    mu, cov = real.mean(0), real.T.cov()
    assert fid(real, 2 * real) == pytest.approx(float(mu.square().sum() + cov.trace()), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_rotated_basis_matches_plain_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from ditpipe.metrics import _Precomputed

    g = torch.Generator().manual_seed(1)
    real = torch.rand(20, 64, generator=g, dtype=torch.float64)
    fake = torch.rand(20, 64, generator=g, dtype=torch.float64) + 0.2
    ours = fid_kid(real, fake, kid_subsets=5)
    fid = FrechetInceptionDistance(feature=_Precomputed(64))
    kid = KernelInceptionDistance(feature=_Precomputed(64), subsets=5, subset_size=20)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert ours["kid"] == pytest.approx(float(kid.compute()[0]), rel=1e-9)  # full-size subsets: no randomness


def test_kid_is_seeded_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) + 0.3
    state = torch.get_rng_state()
    a = fid_kid(real, fake, kid_subset_size=10, kid_subsets=20, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == fid_kid(real, fake, kid_subset_size=10, kid_subsets=20, seed=0)
    b = fid_kid(real, fake, kid_subset_size=10, kid_subsets=20, seed=1)
    assert b["kid"] != a["kid"] and b["fid"] == a["fid"] and a["kid_std"] > 0
    whole = fid_kid(real, fake)
    assert a["kid_subset_size"] == 10 and whole["kid_subset_size"] == 40
    assert whole["kid_std"] is None  # every subset is the whole set: no spread to report
    assert all(type(a[k]) is float for k in ("fid", "kid", "kid_std"))


def test_fid_kid_rejects_bad_input():
    with pytest.raises(DitpipeError, match="at least 2 fake samples"):
        fid_kid(torch.randn(10, 4), torch.randn(1, 4))
    with pytest.raises(DitpipeError, match="at least 2 real samples"):
        fid_kid(torch.randn(1, 4), torch.randn(10, 4))
    with pytest.raises(DitpipeError, match="differ in size"):
        fid_kid(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(DitpipeError, match="NaN"):
        fid_kid(torch.full((3, 4), math.nan), torch.randn(10, 4))


# --- CLIP score ----------------------------------------------------------------------------------------------------


def test_clip_score_with_a_local_model(tiny_clip, recwarn):
    samples = list(generate(0, 6, 32))
    images, prompts = [s[1] for s in samples], [s[2] for s in samples]
    score = clip_score(images, prompts, str(tiny_clip))
    assert type(score) is float and math.isfinite(score) and 0 <= score <= 100
    arrays = [np.asarray(img) for img in images]
    assert clip_score(arrays, prompts, str(tiny_clip), batch_size=4) == pytest.approx(score, abs=1e-4)
    # a caption longer than the text model's 32 positions is truncated by the tokenizer, end token kept
    long = clip_score(images[:2], ["a red circle " * 20, prompts[1]], str(tiny_clip))
    assert math.isfinite(long)
    assert not [w for w in recwarn if "longer than" in str(w.message)]


def test_clip_model_that_cannot_load_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-clip-here"
    images = [Image.new("RGB", (32, 32))]
    with pytest.raises(DitpipeError, match=f"cannot load a CLIP model.*{re.escape(str(missing))}"):
        clip_score(images, ["a red circle"], str(missing))
    with pytest.raises(DitpipeError, match="one prompt per image"):
        clip_score(images, [], str(missing))
