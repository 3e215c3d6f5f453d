"""Stage ``latents``: encode every prepared image once with the VAE.

Stores the posterior mean and log-variance per sample (so training can resample), and optionally
the horizontally flipped view's. The cache key is the sample's pixel hash + the VAE's weight hash +
resolution + dtypes + flip: re-running with nothing changed encodes nothing, a new VAE re-encodes
everything, and a killed run resumes where it stopped. ``index.json`` maps each sample to its entry.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ditpipe.autoencoder import PreparedImages, load_vae
from ditpipe.cache import TensorCache
from ditpipe.config import LatentsConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import (
    TORCH_DTYPES,
    cache_key,
    exclusive,
    read_json,
    read_jsonl,
    resolve_device,
    state_dict_hash,
    write_json,
)


def latent_key(sample_sha: str, vae_id: str, resolution: int, cfg: LatentsConfig) -> str:
    return cache_key("latents/v1", sample_sha, vae_id, resolution, cfg.dtype, cfg.storage_dtype, cfg.flip)


@torch.no_grad()
def encode_batch(vae: AutoencoderKL, images: torch.Tensor, flip: bool) -> dict[str, torch.Tensor]:
    """(N, 3, H, W) images in [-1, 1] to posterior ``mean``/``logvar`` of shape (N, C, h, w)."""
    param = next(vae.parameters())
    x = images.to(param.device, param.dtype)
    views = {"": x, "_flip": x.flip(-1)} if flip else {"": x}
    out = {}
    for suffix, view in views.items():
        dist = vae.encode(view).latent_dist
        out[f"mean{suffix}"] = dist.mean
        out[f"logvar{suffix}"] = dist.logvar
    return out


def run(cfg: LatentsConfig, prepared: str | Path, vae_dir: str | Path, out_dir: str | Path) -> dict:
    """Encode the samples missing from the cache under ``out_dir`` (or whose entry is damaged); write
    ``index.json``. One writer per cache: a second run on it fails naming the first."""
    with exclusive(out_dir):
        return _run(cfg, prepared, vae_dir, out_dir)


def _run(cfg: LatentsConfig, prepared: str | Path, vae_dir: str | Path, out_dir: str | Path) -> dict:
    t0 = time.perf_counter()
    prepared, out_dir = Path(prepared), Path(out_dir)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    if not (Path(vae_dir) / "config.json").exists():
        raise DitpipeError(f"{vae_dir} holds no VAE: run `ditpipe vae` first")
    resolution = read_json(prepared / "meta.json")["resolution"]
    samples = list(read_jsonl(prepared / "samples.jsonl"))
    if not samples:  # pruning against an empty list would empty the cache
        raise DitpipeError(f"{prepared}/samples.jsonl holds no samples: nothing to encode, cache left as it is")
    vae = load_vae(str(vae_dir))
    vae_id = state_dict_hash(vae)
    device = resolve_device(cfg.device)
    vae = vae.to(device, TORCH_DTYPES[cfg.dtype]).eval()
    store = TORCH_DTYPES[cfg.storage_dtype]

    cache = TensorCache(out_dir / "cache", "latents")
    cache.clean_temps()
    keys = [latent_key(s["sha256"], vae_id, resolution, cfg) for s in samples]
    todo = [i for i, k in enumerate(keys) if not cache.valid(k)]
    images = PreparedImages(prepared, None)
    loader = DataLoader(Subset(images, todo), batch_size=cfg.batch_size, num_workers=0)
    meta = {"vae": vae_id, "resolution": str(resolution)}
    done = 0
    with tqdm(total=len(todo), desc="latents", unit="img", disable=None) as bar:
        for batch in loader:
            enc = encode_batch(vae, batch, cfg.flip)
            for j in range(len(batch)):
                i = todo[done + j]
                cache.put(keys[i], {k: v[j].to(store) for k, v in enc.items()}, {**meta, "sample": samples[i]["key"]})
            done += len(batch)
            bar.update(len(batch))
    pruned = cache.prune(keys)
    seconds = time.perf_counter() - t0
    shape = list(cache.get(keys[0])["mean"].shape) if keys else []
    index = {
        "vae_identity": vae_id,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "resolution": resolution,
        "latent_shape": shape,
        "dtype": cfg.dtype,
        "storage_dtype": cfg.storage_dtype,
        "flip": cfg.flip,
        "samples": {s["key"]: k for s, k in zip(samples, keys)},
    }
    write_json(out_dir / "index.json", index)
    return {"encoded": len(todo), "cached": len(keys) - len(todo), "total": len(keys), "pruned": pruned,
            "shape": shape, "seconds": round(seconds, 2), "out": str(out_dir), "device": str(device)}


def summary_line(s: dict) -> str:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    shape = "x".join(map(str, s["shape"]))
    return (f"latents: encoded {s['encoded']}, reused {s['cached']} cached, {s['total']} total ({shape}) "
            f"on {s['device']} in {s['seconds']}s ({rate:.0f} img/s), pruned {s['pruned']} stale -> {s['out']}")
