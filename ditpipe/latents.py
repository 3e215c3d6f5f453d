"""Stage ``latents``: encode every prepared image once with the VAE.

Stores the posterior mean and log-variance per sample (so training can resample), and optionally
the horizontally flipped view's. The cache key is the sample's pixel hash + the VAE's weight hash +
resolution + dtypes + flip: re-running with nothing changed encodes nothing, a new VAE re-encodes
everything, and a killed run resumes where it stopped. ``index.json`` holds what the key is made of
(VAE, resolution, dtypes, flip) and which samples it covers: a reader finds each entry from the sample's sha256.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from ditpipe.autoencoder import PreparedImages, load_vae
from ditpipe.cache import TensorCache, latent_key
from ditpipe.cluster import part_of, run_parts, worker_path
from ditpipe.config import ClusterConfig, LatentsConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import (
    TORCH_DTYPES,
    DiskSet,
    exclusive,
    read_json,
    read_jsonl,
    resolve_device,
    state_dict_hash,
    write_json,
)


def sample_key(sample_sha: str, vae_id: str, resolution: int, cfg: LatentsConfig) -> str:
    return latent_key(sample_sha, vae_id, resolution, cfg.dtype, cfg.storage_dtype, cfg.flip)


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


def run(cfg: LatentsConfig, prepared: str | Path, vae_dir: str | Path, out_dir: str | Path,
        cluster: ClusterConfig | None = None) -> dict:
    """Encode the samples missing from the cache under ``out_dir`` (or whose entry is damaged); write
    ``index.json``. One writer per cache: a second run on it fails naming the first. With a Dask
    ``cluster`` the samples to encode go out in parts by key hash (same cache entries, byte for byte)."""
    with exclusive(out_dir):
        return _run(cfg, prepared, vae_dir, out_dir, cluster or ClusterConfig())


def _vae(vae_dir: str, dtype: str, device: str) -> tuple[AutoencoderKL, str]:
    """The VAE (once per process and version of the folder: a Dask worker keeps it between parts) and its
    weight hash."""
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(vae_dir).iterdir()))
    return _load_vae(vae_dir, dtype, device, stamp)


@functools.lru_cache(maxsize=2)
def _load_vae(vae_dir: str, dtype: str, device: str, stamp: tuple) -> tuple[AutoencoderKL, str]:
    vae = load_vae(vae_dir)
    identity = state_dict_hash(vae)  # of the weights as stored, whatever dtype they are run in
    return vae.to(resolve_device(device), TORCH_DTYPES[dtype]).eval(), identity


def encode_part(cfg: LatentsConfig, prepared: str, vae_dir: str, cache_dir: str, part: int, parts: int,
                progress: bool = False) -> int:
    """Encode the samples of part ``part`` of ``parts`` (by key hash) that the cache lacks; return how many.
    Paths in, entries out through the cache: a Dask task gets and gives nothing bigger."""
    vae, vae_id = _vae(vae_dir, cfg.dtype, cfg.device)
    resolution = read_json(Path(prepared) / "meta.json")["resolution"]
    cache = TensorCache(Path(cache_dir), "latents")

    def mine() -> Iterator[dict]:  # samples.jsonl streamed, never held: memory does not grow with the dataset
        return (row for row in read_jsonl(Path(prepared) / "samples.jsonl")
                if parts == 1 or part_of(row["key"], parts) == part)

    def missing() -> Iterator[tuple[dict, str]]:
        for row in mine():
            key = sample_key(row["sha256"], vae_id, resolution, cfg)
            if not cache.valid(key):
                yield row, key

    store = TORCH_DTYPES[cfg.storage_dtype]
    meta = {"vae": vae_id, "resolution": str(resolution)}
    todo, done = missing(), 0
    with tqdm(total=sum(1 for _ in mine()), desc="latents", unit="img", disable=None if progress else True) as bar:
        while batch := list(itertools.islice(todo, cfg.batch_size)):
            images = PreparedImages(prepared, None, rows=[row for row, _ in batch])
            x = torch.stack([images[j] for j in range(len(batch))])
            # always a full batch: an entry's bytes then do not depend on which samples share its batch or on
            # how many threads encode it (a CPU convolution over 5 images rounds differently on 1 and 2
            # threads), so a Dask part writes what this process writes
            x = torch.cat([x, x.new_zeros((cfg.batch_size - len(x), *x.shape[1:]))])
            enc = encode_batch(vae, x, cfg.flip)
            for j, (row, key) in enumerate(batch):
                cache.put(key, {k: v[j].to(store) for k, v in enc.items()}, {**meta, "sample": row["key"]})
            done += len(batch)
            bar.update(len(batch))
        bar.update(bar.total - bar.n)  # the cached rest
    return done


def _run(cfg: LatentsConfig, prepared: str | Path, vae_dir: str | Path, out_dir: str | Path,
         cluster: ClusterConfig) -> dict:
    t0 = time.perf_counter()
    prepared, out_dir = Path(prepared), Path(out_dir)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    if not (Path(vae_dir) / "config.json").exists():
        raise DitpipeError(f"{vae_dir} holds no VAE: run `ditpipe vae` first")
    resolution = read_json(prepared / "meta.json")["resolution"]
    if next(read_jsonl(prepared / "samples.jsonl"), None) is None:  # pruning against no samples would empty the cache
        raise DitpipeError(f"{prepared}/samples.jsonl holds no samples: nothing to encode, cache left as it is")
    vae, vae_id = _vae(str(vae_dir), cfg.dtype, cfg.device)

    cache = TensorCache(out_dir / "cache", "latents")
    cache.clean_temps()
    parts = 1 if cluster.engine == "local" else cluster.parts
    args = [(cfg, worker_path(prepared), worker_path(vae_dir), worker_path(out_dir / "cache"), part, parts, parts == 1)
            for part in range(parts)]
    encoded = sum(run_parts(cluster, encode_part, args, "latents"))
    listing, total, first = hashlib.sha256(), 0, None
    with DiskSet(out_dir / "cache", "keep") as keep:  # streamed: nothing per sample is held in memory
        for row in read_jsonl(prepared / "samples.jsonl"):
            key = sample_key(row["sha256"], vae_id, resolution, cfg)
            keep.add(key)
            listing.update(f"{row['key']}\t{key}\n".encode())
            total, first = total + 1, first or key
        pruned = cache.prune(keep)
    seconds = time.perf_counter() - t0
    index = {
        "vae_identity": vae_id,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "resolution": resolution,
        "latent_shape": list(cache.get(first)["mean"].shape),
        "dtype": cfg.dtype,
        "storage_dtype": cfg.storage_dtype,
        "flip": cfg.flip,
        # entries are found by cache.latent_key from a sample's sha256 and the fields above; the count and the
        # sha256 of the (sample key, entry) listing say which samples this index covers
        "samples": total,
        "samples_sha256": listing.hexdigest(),
    }
    write_json(out_dir / "index.json", index)
    return {"encoded": encoded, "cached": total - encoded, "total": total, "pruned": pruned,
            "shape": index["latent_shape"], "seconds": round(seconds, 2), "out": str(out_dir),
            "device": str(resolve_device(cfg.device)), "engine": cluster.engine}


def summary_line(s: dict) -> str:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    shape = "x".join(map(str, s["shape"]))
    return (f"latents: encoded {s['encoded']}, reused {s['cached']} cached, {s['total']} total ({shape}) "
            f"on {s['device']} in {s['seconds']}s ({rate:.0f} img/s), pruned {s['pruned']} stale -> {s['out']}")
