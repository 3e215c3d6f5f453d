"""Stage ``vae``: the diffusers ``AutoencoderKL`` that maps images to latents.

``vae.pretrained`` names one by hub id or local path. Empty (the offline default) trains a small
one on the prepared train images. Either way the stage writes a diffusers folder
(``save_pretrained``) whose config carries the latent ``scaling_factor`` (the VAE's own, the one
given in params, or 1/std measured on the train latents), a ``report.json`` with reconstruction PSNR
on val (and, for ``builtin:shapes`` captions, the judge's scores of the val reconstructions: the ceiling
the VAE sets on every sample), and ``recon.png`` (originals above, reconstructions below).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ditpipe import judge
from ditpipe.autoencoder import PreparedImages, downsample_factor, load_vae, reconstruct, to_image
from ditpipe.config import VaeConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import checksum_tree, read_json, resolve_device, staged_dir, state_dict_hash, write_json


def build_vae(cfg: VaeConfig, resolution: int) -> AutoencoderKL:
    """A fresh AutoencoderKL with ``len(block_out_channels) - 1`` halvings."""
    n = len(cfg.block_out_channels)
    groups = min(32, math.gcd(*cfg.block_out_channels))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=groups,
        sample_size=resolution,
        mid_block_add_attention=cfg.mid_attention,
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Pixel MSE plus a small KL term (as in latent diffusion's VAE, without the GAN)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean()


def train_vae(vae: AutoencoderKL, loader: DataLoader, cfg: VaeConfig, device: torch.device) -> list[float]:
    """Train ``vae`` in place for ``cfg.steps`` steps; return the loss of every step."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="vae train", unit="step", disable=None)
    while len(losses) < cfg.steps:
        for x in loader:
            loss = vae_loss(vae, x.to(device), cfg.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if len(losses) == cfg.steps:
                break
    bar.close()
    vae.eval()
    return losses


@torch.no_grad()
def psnr(vae: AutoencoderKL, loader: DataLoader, device: torch.device) -> float:
    """Mean reconstruction PSNR (dB, images in [0, 1]) using the posterior mean."""
    vals = []
    for x in loader:
        x = x.to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        vals += (10 * torch.log10(1.0 / mse)).tolist()
    return float(np.mean(vals)) if vals else float("nan")


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, loader: DataLoader, device: torch.device, limit: int = 1024) -> float:
    """1 / std of sampled latents, so scaled latents have unit variance (the SD recipe)."""
    zs, n = [], 0
    for x in loader:
        zs.append(vae.encode(x.to(device)).latent_dist.sample().flatten().cpu())
        n += len(x)
        if n >= limit:
            break
    return float(1.0 / torch.cat(zs).std())


@torch.no_grad()
def recon_grid(vae: AutoencoderKL, images: torch.Tensor, device: torch.device) -> Image.Image:
    """Originals in the top row, reconstructions below."""
    recon = vae.decode(vae.encode(images.to(device)).latent_dist.mode()).sample.cpu()
    n, (_, h, w) = len(images), images.shape[1:]
    grid = Image.new("RGB", (n * w, 2 * h))
    for i in range(n):
        grid.paste(to_image(images[i]), (i * w, 0))
        grid.paste(to_image(recon[i]), (i * w, h))
    scale = max(1, 128 // h)  # small images are unreadable at 1:1
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def judged_reconstructions(vae: AutoencoderKL, images: PreparedImages) -> dict | None:
    """The judge's scores of ``images`` after a trip through the VAE; None when the captions are not shapes ones."""
    captions = [r["caption"] for r in images.rows]
    if not judge.applicable(captions):
        return None
    loader = DataLoader(images, batch_size=64)
    recon = torch.cat([reconstruct(vae, x) for x in loader])
    scores = judge.score(map(to_image, recon), captions)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}


def run(cfg: VaeConfig, prepared: str | Path, out_dir: str | Path) -> dict:
    """Load or train the VAE, measure it, and write the diffusers folder to ``out_dir``."""
    t0 = time.perf_counter()
    prepared = Path(prepared)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    resolution = read_json(prepared / "meta.json")["resolution"]
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train = PreparedImages(prepared, "train", flip=True)
    val = PreparedImages(prepared, "val")
    if len(train) == 0:
        raise DitpipeError(f"{prepared} has no train images")
    eval_set = val if len(val) else PreparedImages(prepared, "train")
    eval_loader = DataLoader(eval_set, batch_size=64)
    losses: list[float] = []
    if cfg.pretrained:
        vae = load_vae(cfg.pretrained, cfg.subfolder).to(device).eval()
    else:
        vae = build_vae(cfg, resolution)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train) > cfg.batch_size,
                            generator=gen)
        losses = train_vae(vae, loader, cfg, device)
    if cfg.scaling_factor > 0:
        vae.register_to_config(scaling_factor=cfg.scaling_factor)
        how = "params"
    elif cfg.pretrained:
        how = "pretrained config"
    else:
        plain = DataLoader(PreparedImages(prepared, "train"), batch_size=64)
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, plain, device))
        how = "measured 1/std"
    quality = psnr(vae, eval_loader, device)
    judged = judged_reconstructions(vae, eval_set)
    grid = recon_grid(vae, torch.stack([eval_set[i] for i in range(min(8, len(eval_set)))]), device)
    vae = vae.to("cpu", torch.float32)
    report = {
        "source": cfg.pretrained or "trained",
        "psnr_db": round(quality, 3),
        "psnr_split": "val" if len(val) else "train",
        "judged": judged,
        "scaling_factor": float(vae.config.scaling_factor),
        "scaling_factor_from": how,
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "latent_channels": int(vae.config.latent_channels),
        "downsample": downsample_factor(vae),
        "latent_size": resolution // downsample_factor(vae),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_steps": len(losses),
        "final_loss": round(float(np.mean(losses[-20:])), 6) if losses else None,
        "identity": state_dict_hash(vae),
    }
    with staged_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        grid.save(tmp / "recon.png")
        write_json(tmp / "report.json", report)
        write_json(tmp / "losses.json", [round(v, 6) for v in losses])
        checksum_tree(tmp)  # latents, train and evaluate check the VAE against it before loading
    return {**report, "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir)}


def summary_line(s: dict) -> str:
    j = s.get("judged")
    judged = (f"judged reconstructions colour {j['color']:.0%} shape {j['shape']:.0%}, " if j else "")
    sf = f"scaling factor {s['scaling_factor']:.4f} ({s['scaling_factor_from']})"
    return (f"vae: {s['source']} AutoencoderKL, {s['parameters'] / 1e6:.2f}M params, /{s['downsample']} to "
            f"{s['latent_channels']}x{s['latent_size']}x{s['latent_size']} latents, {s['psnr_split']} PSNR "
            f"{s['psnr_db']:.2f} dB, {judged}{sf} in {s['seconds']}s -> {s['out']}")
