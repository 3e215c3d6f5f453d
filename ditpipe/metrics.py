"""Image-quality metrics over features and models handed in: FID, KID and CLIP score, all computed by torchmetrics.

A leaf module: nothing is loaded here except through what the caller passes (features from
``ditpipe.backbones``, or a CLIP hub id / local path).

* FID and KID: ``torchmetrics`` ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` fed with precomputed
  (N, D) features through a pass-through feature module, in float64. KID uses the polynomial kernel
  ``(x.y / D + 1) ** 3`` over ``kid_subsets`` random subsets of ``min(kid_subset_size, n_real, n_fake)`` samples,
  drawn with the torch RNG seeded with ``seed`` (the caller's RNG state is restored afterwards).
* CLIP score: ``torchmetrics`` ``CLIPScore`` (100 x cosine of image and text embeddings, mean over samples,
  clamped at 0) with a transformers ``CLIPModel`` + ``CLIPProcessor`` loaded from the given id or path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ditpipe.errors import DitpipeError

CLIP_UNAVAILABLE = (
    "no CLIP model given (evaluate.clip_model); no CLIP weights install offline, so CLIP score is not computed"
)


class _Precomputed(torch.nn.Module):
    """A torchmetrics feature module whose "images" are already features: checks their shape, returns them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) features, got {tuple(features.shape)}")
        return features


def _check_features(real: torch.Tensor, fake: torch.Tensor) -> None:
    for name, f in (("real", real), ("fake", fake)):
        if f.dim() != 2:
            raise DitpipeError(f"{name} features must be (N, D), got shape {tuple(f.shape)}")
        if len(f) < 2:
            raise DitpipeError(f"FID/KID need at least 2 {name} samples, got {len(f)}")
        if not torch.isfinite(f).all():
            raise DitpipeError(f"{name} features contain NaN or inf")
    if real.shape[1] != fake.shape[1]:
        raise DitpipeError(f"real and fake features differ in size: {real.shape[1]} vs {fake.shape[1]}")


def _common_basis(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in an orthonormal basis of the span of all their features, when that is smaller than D.

    A rotation keeps every inner product, hence means, covariance spectra, FID and the KID kernel (whose gamma is
    pinned to 1/D by the caller), exactly. It matters because with fewer samples than dimensions the covariances
    are singular, and torchmetrics' eigvals of a singular 2048x2048 product takes ~20 s on 2 cores and adds
    sqrt-of-rounding-noise from the null space; in the span the same math takes milliseconds.
    """
    n_real, dim = real.shape
    if n_real + len(fake) >= dim:
        return real, fake
    q, _ = torch.linalg.qr(torch.cat([real, fake]).T)  # (D, n) with orthonormal columns spanning every feature
    return real @ q, fake @ q


def _fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def _kid(real: torch.Tensor, fake: torch.Tensor, subset: int, subsets: int, gamma: float,
         seed: int) -> tuple[float, float]:
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")  # we hold them anyway
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=subset,
                                      gamma=gamma)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    # KID draws its subsets with the global torch RNG: seed it, without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000, kid_subsets: int = 100,
            seed: int = 0) -> dict:
    """FID and KID between (N, D) feature sets, through torchmetrics; deterministic for a given ``seed``.

    Returns {"fid", "kid", "kid_std", "n_real", "n_fake", "kid_subset_size"}. Needs >= 2 samples on each side.
    ``kid_std`` is None when the subsets are the whole sets (fewer samples than ``kid_subset_size``): every subset
    is then the same draw and their spread says nothing.
    """
    _check_features(real, fake)
    # float64 in: torchmetrics accumulates FID in float64 but casts the result back to the input dtype, and KID's
    # unbiased MMD subtracts large kernel means, so float32 features would lose the small values we care about.
    real64, fake64 = _common_basis(real.detach().cpu().double(), fake.detach().cpu().double())
    subset = min(kid_subset_size, len(real), len(fake))
    # gamma = 1/D of the original features (torchmetrics' default), whatever basis they are passed in
    kid, kid_std = _kid(real64, fake64, subset, kid_subsets, 1.0 / real.shape[1], seed)
    if subset == min(len(real), len(fake)) and len(real) == len(fake):
        kid_std = None
    return {"fid": _fid(real64, fake64), "kid": kid, "kid_std": kid_std, "n_real": len(real), "n_fake": len(fake),
            "kid_subset_size": subset}


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose get_*_features return tensors: transformers 5 returns model outputs, torchmetrics 1.9
    divides the result by its norm."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _TruncatingProcessor:
    """Tokenize with truncation to the model's length: torchmetrics cuts over-long token ids itself, which drops
    the end-of-text token CLIP pools from, so a long caption would be scored from the wrong position."""

    def __init__(self, processor: Any, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, **kwargs: Any) -> Any:
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(**kwargs)


def _clip_loader(model: str, device: str | torch.device) -> Callable[[], tuple[torch.nn.Module, Any]]:
    """The callable CLIPScore accepts in place of a model name: loads ``model`` (hub id or local path)."""

    def load() -> tuple[torch.nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            clip = CLIPModel.from_pretrained(model)
            processor = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DitpipeError(f"cannot load a CLIP model and processor from evaluate.clip_model={model!r} ({e}); "
                               "give a local folder saved with save_pretrained or a cached hub id") from e
        max_length = clip.config.text_config.max_position_embeddings
        return _TensorFeatures(clip.eval().to(device)), _TruncatingProcessor(processor, max_length)

    return load


def _as_chw_uint8(image: Image.Image | np.ndarray) -> torch.Tensor:
    """A PIL image (any mode, made RGB) or a uint8 (H, W, 3) array as a (3, H, W) uint8 tensor."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image)}")
    return torch.tensor(image).permute(2, 0, 1)  # a copy: from_numpy warns on read-only (PIL) arrays


def clip_score(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str], model: str, batch_size: int = 32,
               device: str | torch.device = "cpu") -> float:
    """Mean CLIP score (torchmetrics CLIPScore, 0..100) of ``images`` against their ``prompts``.

    ``model``: a CLIP hub id (offline: must be cached) or a local folder with CLIPModel + CLIPProcessor files.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(prompts):
        raise DitpipeError(f"CLIP score needs one prompt per image, got {len(images)} images, {len(prompts)} prompts")
    if not len(images):
        raise DitpipeError("CLIP score needs at least one image")
    metric = CLIPScore(model_name_or_path=_clip_loader(model, device)).to(device)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            # torchmetrics runs the model on the device of the image tensors
            batch = [_as_chw_uint8(img).to(device) for img in images[start:start + batch_size]]
            metric.update(batch, list(prompts[start:start + batch_size]))
        return float(metric.compute())
