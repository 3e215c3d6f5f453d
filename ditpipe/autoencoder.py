"""The VAE floor: loading an ``AutoencoderKL``, images to and from tensors, prepared images, decoding.

Shared by the stages that touch pixels (``vae``, ``latents``, ``train``'s in-run samples, ``evaluate``,
``generate``, ``export``), so none of them imports another stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import Dataset

from ditpipe.errors import DitpipeError
from ditpipe.io import pixel_hash, read_jsonl, verify_tree

REPREPARE = "re-run `ditpipe prepare` (or `dvc checkout prepare` if DVC has it cached)"


def downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a (3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] to an RGB PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def load_prepared(root: Path, row: dict) -> Image.Image:
    """One prepared image (a ``samples.jsonl`` row), checked against the pixel sha256 ``prepare`` recorded."""
    path = Path(root) / row["file"]
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise DitpipeError(f"prepared image {path} is missing: {REPREPARE}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a cut or garbled file
        raise DitpipeError(f"prepared image {path} is damaged ({exc}): {REPREPARE}") from None
    if pixel_hash(img) != row["sha256"]:
        raise DitpipeError(f"prepared image {path} is damaged (its pixels differ from the sha256 in samples.jsonl): "
                           f"{REPREPARE}")
    return img


class PreparedImages(Dataset):
    """Images of one split of a prepared folder, as [-1, 1] tensors; loaded lazily, each checked against the
    pixel sha256 ``prepare`` recorded for it (a damaged image is an error naming it, never encoded)."""

    def __init__(self, prepared: str | Path, split: str | None, flip: bool = False, rows: list[dict] | None = None):
        self.root = Path(prepared)
        if rows is None:  # given rows: only those (a stage streaming samples.jsonl in chunks holds one chunk)
            rows = [r for r in read_jsonl(self.root / "samples.jsonl") if split is None or r["split"] == split]
        self.rows = rows
        self.flip = flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = to_tensor(load_prepared(self.root, self.rows[i]))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def load_vae(pretrained: str, subfolder: str = "") -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` with a clear error for a bad id or path; a folder the ``vae`` stage wrote
    is checked against its ``checksums.json`` first."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    folder = Path(pretrained) / subfolder
    if (folder / "checksums.json").is_file() and (problem := verify_tree(folder)):
        raise DitpipeError(f"the VAE at {folder} is damaged: {problem}; re-run `ditpipe vae` (or `dvc checkout vae`)")
    try:
        return AutoencoderKL.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError) as exc:
        raise DitpipeError(f"cannot load an AutoencoderKL from vae.pretrained={pretrained!r}: {exc}") from None


def latent_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling factor, shift factor): the denoiser sees ``(z - shift) * scale``."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def decode(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Denoiser-space latents (N, C, h, w) to images (N, 3, H, W) in [-1, 1] on the CPU, in batches."""
    scale, shift = latent_scale(vae)
    param = next(vae.parameters())
    out = []
    for chunk in x.split(batch_size):
        z = chunk.to(param.device, param.dtype) / scale + shift
        out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, 0, 0)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] through the VAE and back (posterior mean): what the VAE lets a denoiser reach."""
    param = next(vae.parameters())
    out = []
    for chunk in images.split(batch_size):
        z = vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mode()
        out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)
