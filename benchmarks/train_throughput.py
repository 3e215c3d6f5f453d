"""Training throughput from shards, against two baselines measured in the same run.

    python benchmarks/train_throughput.py              # default CPU config, then 256px with an SD-sized VAE
    python benchmarks/train_throughput.py --only small # just the default CPU config

For each config:
- shards:  the training step as `ditpipe train` runs it: loader -> resample latents -> loss -> step;
- usual:   the same model trained the way diffusers' training examples do it: decode the PNGs, encode
           them with the VAE and the captions with the text encoder inside every step;
- bare:    forward/backward/step of the same model on tensors already in memory (the ceiling).
Prints images/s of each, the speed-up of shards over usual, and the loop's overhead over bare; then the
bare step with each `train.optimizer` (fresh models, same batch), to show what Muon's orthogonalisation costs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ditpipe.autoencoder import PreparedImages, load_vae  # noqa: E402
from ditpipe.config import TrainConfig, load_config  # noqa: E402
from ditpipe.encoders import TextEncoder  # noqa: E402
from ditpipe.loader import empty_caption, load_index, make_loader  # noqa: E402
from ditpipe.models import build_model  # noqa: E402
from ditpipe.objectives import build_objective  # noqa: E402
from ditpipe.optim import OPTIMIZERS  # noqa: E402
from ditpipe.stages import run_stage  # noqa: E402
from ditpipe.train import Batch, diffusion_loss, make_batch, model_spec  # noqa: E402
from ditpipe.vae import build_vae  # noqa: E402

SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}


def build_data(work: Path, count: int, resolution: int, vae_path: str = "") -> object:
    overrides = [f"data.count={count}", f"data.resolution={resolution}", f"vae.pretrained={vae_path}",
                 "vae.steps=30", "data.val_fraction=0.0"]
    overrides += [f"paths.{k}={work / k}" for k in ("prepared", "vae", "latents", "text", "shards")]
    cfg = load_config(None, overrides)
    for stage in ("prepare", "vae", "latents", "text", "shards"):
        run_stage(stage, cfg)
    return cfg


def timed_steps(step_fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step_fn()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t) / steps


def optimiser_step(model, opt, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def bench(cfg, arch: str, size: str, batch_size: int, steps: int, workers: int = 0) -> None:
    index = load_index(cfg.paths.shards)
    spec = model_spec(index)
    torch.manual_seed(0)
    model = build_model(arch, size, spec)
    opt = OPTIMIZERS[TrainConfig().optimizer](model, 1e-4, 0.0)
    objective = build_objective("rectified_flow")
    tcfg = TrainConfig(batch_size=batch_size)
    gen = torch.Generator().manual_seed(0)
    empty = empty_caption(cfg.paths.shards)
    scale = index["latents"]["scaling_factor"]
    cpu = torch.device("cpu")

    data = iter(make_loader(cfg.paths.shards, "train", batch_size, infinite=True, num_workers=workers))

    def shards_step() -> None:
        batch = make_batch(next(data), empty, tcfg, gen, scale, 0.0, cpu)
        optimiser_step(model, opt, diffusion_loss(model, objective, batch, gen))

    vae = load_vae(cfg.paths.vae).eval()
    enc = TextEncoder(cfg.text.encoder, cfg.text.max_length, "float32", cpu)
    images = torch.utils.data.DataLoader(PreparedImages(cfg.paths.prepared, "train"), batch_size=batch_size,
                                         shuffle=True, drop_last=True)
    captions = [r["caption"] for r in images.dataset.rows]
    usual_iter = iter(images)

    def usual_step() -> None:
        nonlocal usual_iter
        try:
            x = next(usual_iter)
        except StopIteration:
            usual_iter = iter(images)
            x = next(usual_iter)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample() * scale
            text = enc.encode(captions[:batch_size])
        batch = Batch(z, text["emb"], text["mask"].long(), text["pooled"])
        optimiser_step(model, opt, diffusion_loss(model, objective, batch, gen))

    fixed = make_batch(next(data), empty, tcfg, gen, scale, 0.0, cpu)

    def bare_step() -> None:
        optimiser_step(model, opt, diffusion_loss(model, objective, fixed, gen))

    c, h = spec.latent_channels, spec.latent_size
    print(f"\n== {arch} {size} on {c}x{h}x{h} latents ({index['latents']['resolution']}px images), "
          f"batch {batch_size}, {steps} timed steps, {torch.get_num_threads()} threads, {workers} loader workers")
    results = {}
    for name, fn in (("bare", bare_step), ("shards", shards_step), ("usual", usual_step)):
        results[name] = timed_steps(fn, steps)
        print(f"{name:7} {batch_size / results[name]:9.1f} img/s   {results[name] * 1000:8.1f} ms/step")
    print(f"shards vs usual: {results['usual'] / results['shards']:.1f}x faster;  "
          f"loop overhead over bare: {(results['shards'] / results['bare'] - 1) * 100:+.1f}%")
    per_opt = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        m = build_model(arch, size, spec)
        o = make(m, 1e-4, 0.0)
        per_opt[name] = timed_steps(lambda m=m, o=o: optimiser_step(m, o, diffusion_loss(m, objective, fixed, gen)),
                                    steps)
        print(f"bare, {name:5} {batch_size / per_opt[name]:7.1f} img/s   {per_opt[name] * 1000:8.1f} ms/step")
    print(f"muon over adamw: {(per_opt['muon'] / per_opt['adamw'] - 1) * 100:+.1f}% per step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("small", "sd256"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the shards path")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores")
    if args.only in (None, "small"):
        with tempfile.TemporaryDirectory() as d:
            defaults = load_config(None)
            cfg = build_data(Path(d), 512, defaults.data.resolution)
            bench(cfg, defaults.model.arch, defaults.model.size, defaults.train.batch_size, args.steps, args.workers)
    if args.only in (None, "sd256"):
        with tempfile.TemporaryDirectory() as d:
            sd_vae = Path(d) / "sd-vae"
            vae_cfg = load_config(None, [f"vae.{k}={v}" for k, v in SD_VAE.items()]).vae
            build_vae(vae_cfg, 256).save_pretrained(sd_vae)  # random weights: the cost, not the quality
            cfg = build_data(Path(d), 48, 256, str(sd_vae))
            bench(cfg, "cross", "XS/2", 8, max(3, args.steps // 5), args.workers)


if __name__ == "__main__":
    main()
