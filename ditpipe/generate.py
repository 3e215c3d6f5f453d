"""A finished run, ready to draw: its EMA denoiser, the VAE it was trained on, and its text encoder.

``ditpipe generate "a large red circle above a small blue square"`` uses this with nothing but the
run folder: the VAE is the one the run's params name (checked against the weights the run was trained
on), and the prompt is encoded by the run's own text encoder (checked the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from ditpipe.autoencoder import decode, load_vae, to_image
from ditpipe.encoders import TextEncoder
from ditpipe.errors import DitpipeError
from ditpipe.io import TORCH_DTYPES, resolve_device, state_dict_hash
from ditpipe.models import Denoiser, RunInfo, final_dir, load_denoiser
from ditpipe.sampling import Conditioning, build_scheduler, resolve_sampler, sample


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere (CPU autocast is slower than fp32 at these sizes)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def load_run_vae(info: RunInfo, vae_dir: str | Path | None = None) -> AutoencoderKL:
    """The VAE the run's latents came from: ``vae_dir``, else the run's ``paths.vae``; its weights must match."""
    where = Path(vae_dir or info.config.get("paths", {}).get("vae", "artifacts/vae"))
    if not (where / "config.json").exists():
        raise DitpipeError(f"no VAE at {where}: give the folder of the VAE this run was trained with (--vae)")
    vae = load_vae(str(where)).eval()
    if state_dict_hash(vae) != info.latents["vae_identity"]:
        raise DitpipeError(f"the VAE at {where} is not the one this run's latents were encoded with "
                           f"(weights differ): re-run `ditpipe vae` as it was, or give the right one (--vae)")
    return vae


def load_run_encoder(info: RunInfo, device: torch.device) -> TextEncoder:
    """The run's text encoder, checked against the identity its caption cache was built with."""
    enc = TextEncoder(info.text["encoder"], int(info.text["max_length"]), info.text.get("dtype", "float32"), device)
    if enc.identity != info.text["encoder_identity"]:
        raise DitpipeError(f"text encoder {info.text['encoder']!r} now loads different weights than the run was "
                           "trained with; prompts would be embedded differently")
    return enc


@dataclass
class Drawer:
    """Prompt embeddings in, images out, for one trained run."""

    model: Denoiser
    info: RunInfo
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.info.spec.latent_channels, self.info.spec.latent_size, self.info.spec.latent_size)

    def latents(self, cond: Conditioning, empty: dict[str, torch.Tensor], seeds: list[int], *, sampler: str,
                steps: int, guidance_scale: float, batch_size: int = 64, progress: str | None = None) -> torch.Tensor:
        scheduler = build_scheduler(sampler, self.info.objective)
        return sample(self.model, scheduler, cond, empty, seeds, self.latent_shape, steps=steps,
                      guidance_scale=guidance_scale, batch_size=batch_size, dtype=self.dtype, progress=progress)

    def images(self, cond: Conditioning, empty: dict[str, torch.Tensor], seeds: list[int], **kw) -> list[Image.Image]:
        return [to_image(x) for x in decode(self.vae, self.latents(cond, empty, seeds, **kw))]


def load_drawer(run: str | Path, vae_dir: str | Path | None = None, device: str = "auto",
                dtype: str = "auto") -> Drawer:
    """A :class:`Drawer` for the run folder (or its ``final/``)."""
    dev = resolve_device(device)
    model, info = load_denoiser(final_dir(run), dev)
    vae = load_run_vae(info, vae_dir).to(dev)
    return Drawer(model, info, vae, dev, sampling_dtype(dtype, dev))


def generate(run: str | Path, prompt: str, n: int = 8, guidance_scale: float = 4.0, steps: int = 30, seed: int = 0,
             sampler: str = "auto", vae_dir: str | Path | None = None, device: str = "auto") -> list[Image.Image]:
    """``n`` images of ``prompt`` (seeds ``seed`` .. ``seed + n - 1``) from a finished run."""
    drawer = load_drawer(run, vae_dir, device)
    resolve_sampler(sampler, drawer.info.objective, key="--sampler")
    enc = load_run_encoder(drawer.info, drawer.device)
    both = enc.encode([prompt, ""])
    cond = Conditioning(both["emb"][:1].expand(n, -1, -1), both["mask"][:1].expand(n, -1),
                        both["pooled"][:1].expand(n, -1))
    empty = {k: v[1].cpu() for k, v in both.items()}
    return drawer.images(cond.to(torch.device("cpu")), empty, list(range(seed, seed + n)), sampler=sampler,
                         steps=steps, guidance_scale=guidance_scale)
