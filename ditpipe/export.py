"""Stage ``export``: the run as one folder that a diffusers user loads with ``from_pretrained``.

``paths.export`` holds ``model_index.json`` and ``transformer/``, ``vae/``, ``scheduler/``,
``text_encoder/``, ``tokenizer/`` (written by ``DitpipePipeline.save_pretrained``), plus a model card
(``README.md``) with the data version, the params and the metrics with their protocol, and the sample
grid the metrics were measured on. The scheduler, steps and guidance scale are the evaluated ones.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ditpipe.errors import DitpipeError
from ditpipe.generate import load_run_encoder, load_run_vae
from ditpipe.io import read_json, staged_dir
from ditpipe.models import RunInfo, final_dir, load_denoiser
from ditpipe.sampling import build_scheduler

USAGE = """```python
from ditpipe.pipeline import DitpipePipeline

pipe = DitpipePipeline.from_pretrained("{path}")
images = pipe("{prompt}", num_images_per_prompt=4).images
images[0].save("sample.png")
```"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def model_card(info: RunInfo, metrics: dict | None, protocol: dict | None, path: str, prompt: str) -> str:
    """README.md of the exported folder: what the model is, what it was trained on, and how well it draws."""
    cfg = info.config
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [ditpipe, text-to-image, "
             f"{info.arch}]", "---", "", f"# ditpipe {info.arch} {info.size} ({info.objective})", "",
             f"A {info.parameters / 1e6:.2f}M-parameter `{info.arch}` denoiser trained for {info.step} steps with "
             f"`{info.objective}` on {info.spec.latent_channels}x{info.spec.latent_size}x{info.spec.latent_size} "
             f"latents of a VAE, captions embedded by `{info.text['encoder']}` ({info.text['dim']}-d, "
             f"{info.text['max_length']} tokens).", "", "## Use", "", USAGE.format(path=path, prompt=prompt), "",
             "## Data version", "",
             f"- dataset: `{cfg.get('data', {}).get('source', '?')}` at {info.latents.get('resolution')}px",
             f"- shards index sha256: `{info.shards_index_sha256}`",
             f"- VAE weights: `{info.latents['vae_identity']}`",
             f"- text encoder weights: `{info.text['encoder_identity']}`", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        for key in ("fid", "kid", "kid_std", "clip_score"):
            lines.append(f"| {key} | {_fmt(metrics.get(key))} |")
        for name, label in (("accuracy", "judged (samples)"), ("accuracy_real", "judged (real val images)"),
                            ("accuracy_vae", "judged (VAE reconstructions)")):
            acc = metrics.get(name) or {}
            for attr in ("color", "shape", "relation", "count"):
                if acc.get(attr) is not None:
                    lines.append(f"| {label}: {attr} | {acc[attr]:.1%} |")
        lines += [""] + [f"- {n}" for n in metrics.get("notes", [])] + [""]
    else:
        lines += ["## Metrics", "", "Not evaluated: run `ditpipe evaluate` (or `dvc repro`) before exporting.", ""]
    if protocol:
        lines += ["## Protocol", "", "```json", json.dumps(protocol, indent=2), "```", ""]
        lines += ["![samples](grid.png)", ""]
    lines += ["## Params", "", "```json", json.dumps({k: cfg.get(k) for k in ("model", "train", "evaluate")
                                                      if k in cfg}, indent=2), "```", ""]
    return "\n".join(lines)


def run(train_dir: str | Path, vae_dir: str | Path, evaluate_dir: str | Path, metrics_path: str | Path,
        out_dir: str | Path) -> dict:
    """Write the diffusers pipeline folder and its model card to ``out_dir``."""
    from ditpipe.pipeline import DitpipePipeline

    t0 = time.perf_counter()
    evaluate_dir = Path(evaluate_dir)
    model, info = load_denoiser(final_dir(train_dir))
    vae = load_run_vae(info, vae_dir)
    encoder = load_run_encoder(info, torch.device("cpu"))
    protocol = read_json(evaluate_dir / "protocol.json") if (evaluate_dir / "protocol.json").exists() else None
    metrics = read_json(metrics_path) if Path(metrics_path).exists() else None
    if protocol and protocol["model"]["step"] != info.step:
        raise DitpipeError(f"{evaluate_dir} evaluated step {protocol['model']['step']}, but the run is at step "
                           f"{info.step}: re-run `ditpipe evaluate` first")
    sampler = protocol["sampler"] if protocol else "auto"
    pipe = DitpipePipeline(transformer=model.inner, vae=vae, scheduler=build_scheduler(sampler, info.objective),
                           text_encoder=encoder.model, tokenizer=encoder.tokenizer, max_length=encoder.max_length,
                           default_steps=protocol["steps"] if protocol else 30,
                           default_guidance_scale=protocol["guidance_scale"] if protocol else 4.0)
    prompt = "a large red circle above a small blue square"
    if (evaluate_dir / "samples" / "metadata.jsonl").exists():
        with open(evaluate_dir / "samples" / "metadata.jsonl") as f:
            prompt = json.loads(f.readline())["text"]
    with staged_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if (evaluate_dir / "grid.png").exists():
            shutil.copy(evaluate_dir / "grid.png", tmp / "grid.png")
        (tmp / "README.md").write_text(model_card(info, metrics, protocol, str(out_dir), prompt))
    size = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    return {"out": str(out_dir), "arch": info.arch, "step": info.step, "sampler": sampler, "bytes": size,
            "evaluated": protocol is not None, "seconds": round(time.perf_counter() - t0, 2)}


def summary_line(s: dict) -> str:
    card = "model card with metrics" if s["evaluated"] else "model card (not evaluated)"
    return (f"export: {s['arch']} at step {s['step']} as a diffusers DitpipePipeline ({s['sampler']} scheduler), "
            f"{card}, {s['bytes'] / 1e6:.1f} MB in {s['seconds']}s -> {s['out']}")
