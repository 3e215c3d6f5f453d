"""The figures behind docs/SCALE.md: what each stage costs per image at 256px, measured here where a CPU can
measure it and counted in FLOPs where only a GPU could, then projected to 10M and 400M image-caption pairs.

    python benchmarks/scale_plan.py                       # measure, then print the plan
    python benchmarks/scale_plan.py --mfu 0.3 --gpu-hour 2.5 --core-hour 0.04

Measured on this machine: `prepare` per image (decode, verify, resize/crop to 256, pixel sha256, PNG) on
photo-like 512x384 JPEGs; an SD-sized AutoencoderKL encoder (f8, 4 latent channels, random weights: the
FLOPs and speed are those of the real one) at 256px, FLOPs counted by torch's FlopCounterMode; MiniLM
captions/s. Counted: T5-XXL's encoder (2 x 4.76e9 params x 120 tokens) and DiT-XL/2's training step
(3 x 2 x 118.6 GMACs, the DiT paper's count), at the given model FLOPs utilisation of an H100 (989 TFLOP/s
dense bf16).
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

H100_FLOPS = 989e12
DIT_XL2_STEP_FLOPS = 3 * 2 * 118.64e9  # forward + backward, per image
T5XXL_ENCODE_FLOPS = 2 * 4.76e9 * 120  # per caption, 120 tokens, attention left out
DAY = 86_400


def prepare_seconds_per_image(n: int = 40, reps: int = 3) -> float:
    from PIL import Image, ImageFilter

    from ditpipe.data.images import NormalizeSpec, png_bytes
    from ditpipe.data.readers import RawSample
    from ditpipe.prepare import process

    rng = np.random.default_rng(0)
    jpgs = []
    for _ in range(n):
        a = (rng.standard_normal((48, 64, 3)) * 60 + 128).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(a).resize((512, 384), Image.Resampling.BICUBIC).filter(ImageFilter.DETAIL)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        jpgs.append(buf.getvalue())
    spec = NormalizeSpec(256, 16, 50_000_000, "white")
    t = time.perf_counter()
    for _ in range(reps):
        for i, data in enumerate(jpgs):
            png_bytes(process(RawSample(key=f"k{i}", data=data, caption="c"), spec).image)
    return (time.perf_counter() - t) / (n * reps)


def vae_encoder() -> tuple[float, float]:
    """(FLOPs per 256px image, images/s on this CPU in fp32) of an SD-sized AutoencoderKL encoder."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    vae = AutoencoderKL(latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, sample_size=256).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.randn(1, 3, 256, 256))
    batch = torch.randn(8, 3, 256, 256)
    with torch.no_grad():
        vae.encode(batch[:2])
        t = time.perf_counter()
        vae.encode(batch)
    return counter.get_total_flops(), len(batch) / (time.perf_counter() - t)


def minilm_captions_per_s(n: int = 512) -> float:
    from ditpipe.encoders import TextEncoder

    enc = TextEncoder("all-MiniLM-L6-v2", 32, "float32", torch.device("cpu"))
    caps = [f"a photo of {i} red circles to the left of a large blue square on a table" for i in range(n)]
    enc.encode(caps[:64])
    t = time.perf_counter()
    for i in range(0, n, 128):
        enc.encode(caps[i : i + 128])
    return n / (time.perf_counter() - t)


def plan(figures: dict, mfu: float, gpu_hour: float, core_hour: float) -> None:
    gpu = H100_FLOPS * mfu
    per_image = {  # (seconds per image on one unit, unit)
        "prepare (decode, resize, hash, PNG)": (figures["prepare_s"], "core"),
        "vae encode (SD-sized, 256px)": (figures["vae_flops"] / gpu, "GPU"),
        "text encode, T5-XXL (120 tokens)": (T5XXL_ENCODE_FLOPS / gpu, "GPU"),
        "text encode, MiniLM (32 tokens)": (1 / figures["minilm_per_s"] * 2, "core"),  # measured on 2 cores
        "shards (1 MB samples)": (figures["shards_s"], "core"),
        "train DiT-XL/2, one epoch": (DIT_XL2_STEP_FLOPS / gpu, "GPU"),
    }
    print(f"\n== plan at {mfu:.0%} MFU of an H100 (${gpu_hour}/GPU-hour), CPU at ${core_hour}/core-hour")
    print(f"{'stage':38} {'per unit':>14} | {'10M: units-hours':>16} {'cost':>9} {'units for 1 day':>15} | "
          f"{'400M: units-hours':>17} {'cost':>9} {'units for 1 day':>15}")
    for name, (s, unit) in per_image.items():
        cells = []
        for n in (10e6, 400e6):
            hours = n * s / 3600
            price = gpu_hour if unit == "GPU" else core_hour
            units = max(1, int(np.ceil(n * s / DAY)))
            cells.append(f"{hours:14,.0f} {unit[:4]:>4} ${hours * price:8,.0f} {units:12,d} {unit[:4]}")
        print(f"{name:38} {1 / s:9,.0f} /s/{unit[:4]:<4}| {cells[0]} | {cells[1]}")
    print("\nbytes per sample: latents 4x32x32 mean+logvar fp16 16 KB (32 KB with flips); T5-XXL embedding "
          "120x4096 fp16 983 KB; MiniLM 32x384 fp32 49 KB")
    for n in (10e6, 400e6):
        print(f"{n / 1e6:5.0f}M samples: latents {n * 16e3 / 1e12:7.1f} TB, T5 embeddings {n * 983e3 / 1e12:8.1f} TB, "
              f"MiniLM embeddings {n * 49e3 / 1e12:6.1f} TB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=0.3, help="model FLOPs utilisation assumed on the GPU")
    p.add_argument("--gpu-hour", type=float, default=2.5, help="price of one H100-hour, USD")
    p.add_argument("--core-hour", type=float, default=0.04, help="price of one CPU core-hour, USD")
    p.add_argument("--shards-ms", type=float, default=2.0,
                   help="shards stage per 1 MB sample on one core, ms (1.1 ms measured at 73 KB samples by "
                        "benchmarks/data_stages.py, plus the copy and hash of 1 MB)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    prep = prepare_seconds_per_image()
    print(f"prepare: {prep * 1e3:.1f} ms per 512x384 JPEG -> 256px PNG on one core ({1 / prep:.0f} images/s)")
    vae_flops, vae_cpu = vae_encoder()
    print(f"vae encode (SD-sized AutoencoderKL encoder, 256px): {vae_flops / 1e9:.1f} GFLOP per image; "
          f"{vae_cpu:.2f} images/s on this CPU (fp32)")
    minilm = minilm_captions_per_s()
    print(f"text encode (all-MiniLM-L6-v2, 32 tokens): {minilm:.0f} captions/s on this CPU")
    plan({"prepare_s": prep, "vae_flops": vae_flops, "minilm_per_s": minilm, "shards_s": args.shards_ms / 1e3},
         args.mfu, args.gpu_hour, args.core_hour)


if __name__ == "__main__":
    main()
