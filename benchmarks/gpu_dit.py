"""Images/s and model FLOPs utilisation of DiT training steps on a GPU (a few minutes).

    python benchmarks/gpu_dit.py                         # DiT-B/2 and DiT-XL/2, 256px, bf16, batch 256
    python benchmarks/gpu_dit.py --sizes XL/2 --compile  # with torch.compile
    python benchmarks/gpu_dit.py --device cpu --sizes T/2 --batch 4 --steps 2   # smoke test without a GPU

The DiT paper's class-conditional setting (32x32x4 latents, 1000 classes, learned sigma), the same
model `ditpipe train` builds; AdamW, bf16 autocast, SDPA attention, TF32 on, latents in memory.
Training FLOPs per image = 3 x forward FLOPs (counted by PyTorch), divided by the device's dense
bf16 peak (H100/H200: 989 TFLOP/s) for MFU.
"""

from __future__ import annotations

import argparse
import time

import torch

from ditpipe.models import Spec, build_model, count_parameters, forward_flops
from ditpipe.train import peak_flops


def bench(size: str, args, device: torch.device) -> None:
    spec = Spec(latent_channels=4, latent_size=args.resolution // 8, text_dim=0, num_classes=1000, learn_sigma=True)
    with torch.device("meta"):
        flops = 3 * forward_flops(build_model("dit", size, spec, mlp_conv=0), spec)  # the paper's DiT
    model = build_model("dit", size, spec, mlp_conv=0).to(device)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    n = args.batch
    x = torch.randn(n, 4, spec.latent_size, spec.latent_size, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    t = torch.randint(0, 1000, (n,), device=device).float()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(x, t, None, None, None, y)
            loss = torch.nn.functional.mse_loss(out[:, :4].float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    images_s = n / seconds
    p = peak_flops(device, args.peak_tflops)
    mfu = f"{images_s * flops / p * 100:5.1f}%" if p else "  n/a"
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:6.1f} GiB" if device.type == "cuda" else ""
    print(f"DiT-{size:5} {count_parameters(model) / 1e6:7.1f}M  batch {n:4d}  {seconds * 1000:8.1f} ms/step  "
          f"{images_s:8.1f} img/s  {flops / 1e9:7.1f} GFLOP/img  MFU {mfu}  {mem}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["B/2", "XL/2"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's peak (TFLOP/s)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; {args.resolution}px, class-conditional DiT (paper setting)")
    for size in args.sizes:
        bench(size, args, device)  # the model and optimizer are freed when it returns
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
