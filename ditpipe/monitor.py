"""In-run evaluation for ``train``: every ``train.eval_every`` steps, from the EMA weights.

- the loss on the val shards with fixed noise and timesteps (the same draws at every evaluation and
  in every run with the same seed), so it is comparable across steps and across runs;
- a small sample grid of val prompts (``run_dir/samples/step-NNNNNN.png``, and MLflow images);
- the judge's compositional accuracy of those samples, when the data is ``builtin:shapes``.

Rows go to ``run_dir/eval.jsonl`` and MLflow, with the training FLOPs spent so far. Nothing here
draws from the training RNG streams, so an exact resume stays exact.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ditpipe import judge
from ditpipe.autoencoder import decode, load_vae, to_image
from ditpipe.config import TrainConfig
from ditpipe.grids import caption_grid
from ditpipe.io import state_dict_hash
from ditpipe.loader import make_loader
from ditpipe.models import Denoiser, trim_padding
from ditpipe.sampling import Conditioning, build_scheduler, sample

log = logging.getLogger(__name__)
VAL_SEED = 20_240_601  # fixed: the val loss's noise and timesteps are the same draws in every evaluation
MAX_VAL = 512  # val samples the loss is averaged over (kept in memory)


def val_batch(shards_dir: str | Path, limit: int = MAX_VAL) -> dict | None:
    """Up to ``limit`` val samples (ordered) as one batch: posterior means, embeddings, captions."""
    parts: dict[str, list] = {}
    n = 0
    for batch in make_loader(shards_dir, "val", 128, shuffle_buffer=0, rank=0, world_size=1, infinite=False):
        for k in ("mean", "emb", "mask", "pooled", "caption"):
            parts.setdefault(k, []).append(batch[k])
        n += len(batch["caption"])
        if n >= limit:
            break
    if not n:
        return None
    out = {k: torch.cat(v)[:limit] for k, v in parts.items() if k != "caption"}
    out["caption"] = [c for chunk in parts["caption"] for c in chunk][:limit]
    return out


class Monitor:
    """Evaluates the EMA model in place during training (main process only)."""

    def __init__(self, cfg: TrainConfig, shards_dir: Path, vae_dir: str | Path | None, index: dict, objective,
                 run_dir: Path, tracker, flops_per_step: float):
        self.cfg, self.objective, self.tracker, self.run_dir = cfg, objective, tracker, run_dir
        self.flops_per_step = flops_per_step
        self.scale = float(index["latents"]["scaling_factor"])
        self.shift = float(index["latents"].get("shift_factor") or 0.0)
        self.val = val_batch(shards_dir)
        gen = torch.Generator().manual_seed(VAL_SEED)
        if self.val is not None:
            n = len(self.val["caption"])
            self.noise = torch.randn(self.val["mean"].shape, generator=gen)
            self.t = objective.sample_t(n, gen)
        self.vae = self._vae(vae_dir, index)
        self.judged = self.val is not None and judge.applicable(self.val["caption"][: cfg.eval_samples])

    @staticmethod
    def _vae(vae_dir: str | Path | None, index: dict):
        if not vae_dir or not (Path(vae_dir) / "config.json").exists():
            return None
        vae = load_vae(str(vae_dir)).eval()
        if state_dict_hash(vae) != index["latents"]["vae_identity"]:
            log.warning("%s is not the VAE these shards were encoded with: no in-run sample grids", vae_dir)
            return None
        return vae

    def due(self, step: int) -> bool:
        return self.cfg.eval_every > 0 and self.val is not None and (
            step % self.cfg.eval_every == 0 or step == self.cfg.steps)

    @torch.no_grad()
    def val_loss(self, model: Denoiser, device: torch.device) -> float:
        total, n = 0.0, len(self.val["caption"])
        for i in range(0, n, 64):
            sl = slice(i, i + 64)
            x0 = ((self.val["mean"][sl].float() - self.shift) * self.scale).to(device)
            noise, t = self.noise[sl].to(device), self.t[sl].to(device)
            emb, mask = trim_padding(self.val["emb"][sl].float(), self.val["mask"][sl].long())
            pred = model(self.objective.noisy(x0, noise, t), t, emb.to(device), mask.to(device),
                         self.val["pooled"][sl].float().to(device))
            total += F.mse_loss(pred.float(), self.objective.target(x0, noise, t).float(), reduction="sum").item()
        return total / self.noise[:n].numel()

    def samples(self, model: Denoiser, empty: dict, step: int) -> dict:
        k = min(self.cfg.eval_samples, len(self.val["caption"]))
        if self.vae is None or k == 0:
            return {}
        cond = Conditioning(self.val["emb"][:k], self.val["mask"][:k], self.val["pooled"][:k])
        latents = sample(model, build_scheduler("auto", self.objective.name), cond, empty, list(range(k)),
                         tuple(self.val["mean"].shape[1:]), steps=self.cfg.eval_steps,
                         guidance_scale=self.cfg.eval_guidance_scale)
        images = [to_image(x) for x in decode(self.vae, latents)]
        captions = self.val["caption"][:k]
        grid = caption_grid(images, captions, title=f"step {step} (EMA), cfg {self.cfg.eval_guidance_scale}")
        (self.run_dir / "samples").mkdir(exist_ok=True)
        grid.save(self.run_dir / "samples" / f"step-{step:06d}.png")
        self.tracker.log_image(grid, "samples", step)
        if not self.judged:
            return {}
        acc = judge.score(images, captions)
        return {f"acc_{a}": acc[a] for a in judge.ATTRIBUTES if acc.get(a) is not None}

    def __call__(self, model: Denoiser, empty: dict, step: int) -> dict:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        row = {"step": step, "val_loss": self.val_loss(model, device), **self.samples(model, empty, step),
               "flops": step * self.flops_per_step}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        model.train(was_training)
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log_metrics({("train_flops" if k == "flops" else k): v for k, v in row.items()
                                  if k not in ("step", "seconds")}, step)
        return row
