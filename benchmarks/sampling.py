"""Sampling and evaluation speed, measured in one process against their own baselines.

1. Sampling images/s: the default denoiser (cross XS/2 on 4x8x8 latents, 32 MiniLM tokens), Euler, 30 steps,
   guidance 4, drawn in batches of 64 vs one image at a time (the baseline), same seeds, same images.
2. With ``--params`` pointing at a finished default run (``dvc repro``): the time of each part of the
   ``evaluate`` stage at its default sizes, with the reference features cold (computed) and warm (cached).

    python benchmarks/sampling.py                      # part 1 only
    python benchmarks/sampling.py --params params.yaml # both, on the run under paths.*
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditpipe.models import Spec, build_model  # noqa: E402
from ditpipe.sampling import Conditioning, build_scheduler, sample  # noqa: E402


def sampling_throughput(n: int, steps: int, guidance: float, batch: int) -> None:
    torch.manual_seed(0)
    model = build_model("cross", "XS/2", Spec(latent_channels=4, latent_size=8, text_dim=384)).eval()
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(n, 32, 384, generator=g), torch.ones(n, 32, dtype=torch.long),
                        torch.randn(n, 384, generator=g))
    empty = {"emb": torch.zeros(32, 384), "mask": torch.ones(32, dtype=torch.long), "pooled": torch.zeros(384)}
    seeds = list(range(n))
    results = {}
    for label, bs in (("one at a time", 1), (f"batches of {batch}", batch)):
        t0 = time.perf_counter()
        out = sample(model, build_scheduler("euler", "rectified_flow"), cond, empty, seeds, (4, 8, 8), steps=steps,
                     guidance_scale=guidance, batch_size=bs)
        dt = time.perf_counter() - t0
        results[label] = (out, n / dt)
        print(f"  {label:16} {n} images, {steps} Euler steps, cfg {guidance}: {dt:6.2f} s  {n / dt:8.1f} images/s")
    (a, base), (b, fast) = results.values()
    same = torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    print(f"  speed-up {fast / base:.1f}x; same images either way: {same}")


def evaluation_time(params: str) -> None:
    from ditpipe import evaluate
    from ditpipe.config import load_config

    cfg = load_config(params)
    p = cfg.paths
    if not (Path(p.train) / "final").exists():
        print(f"  no finished run at {p.train}: run `dvc repro` first")
        return
    tmp = Path(tempfile.mkdtemp(prefix="ditpipe-bench-"))
    try:
        for label in ("cold reference cache", "warm reference cache"):
            t0 = time.perf_counter()
            s = evaluate.run(cfg.evaluate, type(cfg.tracking)(enabled=False), p.train, p.shards, p.vae, p.prepared,
                             tmp / "reference", tmp / "evaluate", tmp / "metrics.json", tmp / "plots")
            total = time.perf_counter() - t0
            scales = len(set(cfg.evaluate.sweep) | {cfg.evaluate.guidance_scale})
            print(f"  {label}: {total:6.1f} s for {s['n']} samples at {scales} guidance scale(s) (sampling one scale: "
                  f"{s['sample_seconds']:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images to draw (default 64)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--params", default=None, help="params.yaml of a finished run: also time the evaluate stage")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("sampling (default denoiser size, random weights):")
    sampling_throughput(args.n, args.steps, args.guidance, args.batch)
    if args.params:
        print("evaluate stage at its default sizes:")
        evaluation_time(args.params)


if __name__ == "__main__":
    main()
