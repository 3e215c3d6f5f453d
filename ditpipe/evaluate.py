"""Stage ``evaluate``: sample the val prompts with the run's EMA weights, then measure what was drawn.

Outputs:

- ``paths.evaluate``: ``samples/`` (an imagefolder: PNGs + ``metadata.jsonl`` with the prompt, seed,
  guidance scale, steps and sampler of every image), ``grid.png`` (prompts under the images),
  ``sweep.png`` (the same prompts at every guidance scale of the sweep), ``protocol.json``;
- ``paths.metrics``: FID and KID (standard FID InceptionV3) against the reference images, CLIP score
  when a CLIP model is given, compositional accuracy on ``builtin:shapes`` (colour, shape, relation,
  count) of the samples, of the real val images (the judge's own check) and of the VAE's
  reconstructions of them (the ceiling the VAE allows); every number beside its protocol;
- ``paths.plots``: metric vs guidance scale, loss and in-run metrics vs training step and FLOPs
  (JSON for ``dvc plots show``, PNG for people), and the sample grid;
- ``paths.reference``: Inception features of the reference images, cached per data version.

FID is biased upwards at small N (it shrinks as N grows, even for the same model): compare FIDs only
at equal N. KID is unbiased, so it is reported beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ditpipe import judge, tracking
from ditpipe.autoencoder import load_prepared, reconstruct, to_image
from ditpipe.config import EvaluateConfig, TrackingConfig
from ditpipe.errors import DitpipeError
from ditpipe.generate import Drawer, load_drawer
from ditpipe.grids import caption_grid
from ditpipe.io import cache_key, exclusive, location, read_json, read_jsonl, sha256_file, staged_dir, write_json
from ditpipe.loader import empty_caption, load_index, make_loader
from ditpipe.models import RunInfo
from ditpipe.sampling import Conditioning, resolve_sampler

FEATURES_PROTOCOL = "inception/v1: uint8 RGB, bilinear resize to 299x299, (x - 128) / 128, 2048-d pool features"


@dataclass
class Prompts:
    """The val split's prompts with their cached caption embeddings, in key order."""

    keys: list[str]
    captions: list[str]
    cond: Conditioning

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Reference:
    """Inception features of the reference images and the data version they were computed on."""

    features: torch.Tensor  # (N, 2048)
    split: str
    data_version: str
    cached: bool


# ---------------------------------------------------------------- the pure core


def sample_plan(n_prompts: int, samples: int, seed: int) -> list[tuple[int, int]]:
    """(prompt index, seed) per image: every prompt once, then again with new seeds, up to ``samples``."""
    n = samples or n_prompts
    return [(i % n_prompts, seed + i) for i in range(n)]


def as_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images to a (N, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def accuracy(images: list[Image.Image], prompts: list[str]) -> dict | None:
    """The judge's scores, or None when the prompts are not ``builtin:shapes`` captions."""
    return judge.score(images, prompts) if prompts and judge.applicable(prompts) else None


def image_metrics(fake: list[Image.Image], prompts: list[str], real_features: torch.Tensor | None, backbone,
                  cfg: EvaluateConfig) -> dict:
    """FID/KID (when a backbone is given), CLIP score (when a CLIP model is given) and judge accuracy."""
    from ditpipe import metrics

    out: dict = {"n": len(fake), "accuracy": accuracy(fake, prompts)}
    if backbone is not None and real_features is not None and len(real_features) >= 2 and len(fake) >= 2:
        from ditpipe.backbones import extract_features

        fake_features = extract_features(backbone, fake, batch_size=32, progress="inception (samples)")
        out.update(metrics.fid_kid(real_features, fake_features, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed))
    out["clip_score"] = metrics.clip_score(fake, prompts, cfg.clip_model) if cfg.clip_model else None
    return out


# ---------------------------------------------------------------- reading inputs


def read_prompts(shards_dir: str | Path) -> Prompts:
    """Keys, captions and caption embeddings of the val shards (one ordered pass)."""
    keys, captions, emb, mask, pooled = [], [], [], [], []
    for batch in make_loader(shards_dir, "val", 256, shuffle_buffer=0, rank=0, world_size=1, infinite=False):
        keys += batch["key"]
        captions += batch["caption"]
        emb.append(batch["emb"])
        mask.append(batch["mask"])
        pooled.append(batch["pooled"])
    if not keys:
        raise DitpipeError(f"{shards_dir} has no val samples to take prompts from: set data.val_fraction above 0")
    return Prompts(keys, captions, Conditioning(torch.cat(emb), torch.cat(mask), torch.cat(pooled)))


def reference_rows(prepared: Path, split: str, count: int) -> list[dict]:
    rows = sorted((r for r in read_jsonl(prepared / "samples.jsonl") if split == "all" or r["split"] == split),
                  key=lambda r: r["key"])
    return rows[:count] if count else rows


def real_images(prepared: Path, rows: list[dict]) -> list[Image.Image]:
    return [load_prepared(prepared, r).convert("RGB") for r in rows]


def reference_features(prepared: Path, cfg: EvaluateConfig, backbone, cache_dir: Path) -> Reference | None:
    """Features of the reference images: from the cache when this data version and backbone were seen before.
    None when there are fewer than 2 (FID and KID need 2 on each side)."""
    from ditpipe.backbones import extract_features

    rows = reference_rows(prepared, cfg.reference_split, cfg.reference_count)
    if len(rows) < 2:
        return None
    resolution = read_json(prepared / "meta.json")["resolution"]
    data_version = cache_key(*(f"{r['key']}:{r['sha256']}" for r in rows))
    key = cache_key("reference/v1", data_version, resolution, backbone.identity, FEATURES_PROTOCOL)
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        return Reference(load_file(str(path))["features"], cfg.reference_split, data_version, True)
    feats = extract_features(backbone, real_images(prepared, rows), batch_size=32, progress="inception (reference)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({"features": feats.contiguous()}, str(tmp), metadata={"data_version": data_version,
                                                                   "split": cfg.reference_split, "n": str(len(rows))})
    tmp.replace(path)
    return Reference(feats, cfg.reference_split, data_version, False)


# ---------------------------------------------------------------- writing outputs


def write_samples(folder: Path, images: list[Image.Image], rows: list[dict]) -> None:
    """An imagefolder: ``NNNNN.png`` + ``metadata.jsonl`` (``file_name``, ``text`` and how it was drawn)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (img, row) in enumerate(zip(images, rows)):
            name = f"{i:05d}.png"
            img.save(folder / name)
            f.write(json.dumps({"file_name": name, **row}, ensure_ascii=False) + "\n")


def training_curves(train_dir: Path, flops_per_step: float) -> tuple[list[dict], list[dict]]:
    """Loss rows and in-run evaluation rows of the run, each with its training FLOPs."""
    def rows(name: str, keep: tuple[str, ...]) -> list[dict]:
        path = train_dir / name
        if not path.exists():
            return []
        return [{"step": r["step"], "flops": r["step"] * flops_per_step, **{k: r[k] for k in keep if k in r}}
                for r in read_jsonl(path)]

    evals = rows("eval.jsonl", ("val_loss", "acc_color", "acc_shape", "acc_relation", "acc_count"))
    return rows("metrics.jsonl", ("loss",)), evals


def training_figures(train_dir: Path, info: RunInfo) -> dict:
    """What the run cost: parameters, forward GFLOPs per image (multiply-accumulates, the DiT paper's unit),
    training FLOPs, median training images/s and the training loop's wall time."""
    path = train_dir / "metrics.jsonl"
    rates = sorted(r["images_per_s"] for r in read_jsonl(path) if r.get("images_per_s")) if path.exists() else []
    return {"parameters": info.parameters, "gflops_per_image": info.flops_per_image / 6e9,
            "train_flops": info.step * info.batch_size * info.flops_per_image,
            "images_per_s": rates[len(rates) // 2] if rates else None, "train_seconds": info.train_seconds}


def plot_png(path: Path, loss: list[dict], evals: list[dict], sweep: list[dict]) -> None:
    """Loss and in-run metrics vs step, and metrics vs guidance scale, for people (DVC gets the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if loss:
        axes[0].plot([r["step"] for r in loss], [r["loss"] for r in loss], label="train loss")
    if evals and "val_loss" in evals[0]:
        axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    for k in ("acc_color", "acc_shape", "acc_relation", "acc_count"):
        if evals and k in evals[0]:
            axes[1].plot([r["step"] for r in evals], [r[k] for r in evals], "o-", label=k[4:])
    axes[1].set(xlabel="step", ylabel="judged right", title="in-run samples (EMA)", ylim=(0, 1.02))
    for k in ("acc_color", "acc_shape", "acc_relation", "acc_count"):
        if sweep and sweep[0].get(k) is not None:
            axes[2].plot([r["guidance_scale"] for r in sweep], [r[k] for r in sweep], "o-", label=k[4:])
    axes[2].set(xlabel="guidance scale", ylabel="judged right", title="accuracy vs guidance", ylim=(0, 1.02))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------- the stage


def flat_accuracy(acc: dict | None, prefix: str = "acc_") -> dict:
    if acc is None:
        return {}
    return {f"{prefix}{k}": acc[k] for k in judge.ATTRIBUTES + ("all", "shape_one", "shape_two")
            if acc.get(k) is not None}


SWEEP_GRID = 8  # prompts per guidance scale in sweep.png


def run_sweep(drawer: Drawer, prompts: Prompts, plan: list[tuple[int, int]], empty: dict, cfg: EvaluateConfig,
              sampler: str, headline: list[Image.Image], real_features, backbone) -> tuple[list[dict], dict]:
    """Metrics at every sweep guidance scale (the headline scale's images are reused); and their images.

    When nothing can be measured at the sweep scales (no judge for these prompts, no sweep FID, no CLIP model),
    only the prompts of the sweep grid are drawn.
    """
    rows, images = [], {}
    texts = [prompts.captions[i] for i, _ in plan]
    measured = bool(judge.applicable(texts) or cfg.sweep_fid or cfg.clip_model)
    part = plan if measured else plan[:SWEEP_GRID]
    idx, seeds = [p for p, _ in part], [s for _, s in part]
    for g in cfg.sweep:
        imgs = headline[: len(part)] if g == cfg.guidance_scale else drawer.images(
            prompts.cond.select(idx), empty, seeds, sampler=sampler, steps=cfg.steps, guidance_scale=g,
            batch_size=cfg.batch_size, progress=f"sample (cfg {g})")
        images[g] = imgs
        if measured:
            m = image_metrics(imgs, texts, real_features if cfg.sweep_fid else None, backbone, cfg)
            rows.append({"guidance_scale": g, **flat_accuracy(m["accuracy"]),
                         **{k: m[k] for k in ("fid", "kid", "clip_score") if m.get(k) is not None}})
    return rows, images


def run(cfg: EvaluateConfig, track: TrackingConfig, train_dir: str | Path, shards_dir: str | Path,
        vae_dir: str | Path, prepared: str | Path, reference_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plots_dir: str | Path) -> dict:
    """Sample, measure and write every output; log to MLflow; return a summary. One evaluation per reference
    cache at a time (a second fails naming the first)."""
    with exclusive(reference_dir):
        return _run(cfg, track, train_dir, shards_dir, vae_dir, prepared, reference_dir, out_dir, metrics_path,
                    plots_dir)


def _run(cfg: EvaluateConfig, track: TrackingConfig, train_dir: str | Path, shards_dir: str | Path,
         vae_dir: str | Path, prepared: str | Path, reference_dir: str | Path, out_dir: str | Path,
         metrics_path: str | Path, plots_dir: str | Path) -> dict:
    t0 = time.perf_counter()
    tracking.check_reachable(track)
    train_dir, shards_dir, prepared = Path(train_dir), location(shards_dir), Path(prepared)
    drawer = load_drawer(train_dir, vae_dir, cfg.device, cfg.dtype)
    info = drawer.info
    sampler = resolve_sampler(cfg.sampler, info.objective)
    index = load_index(shards_dir)
    if index["text"]["encoder_identity"] != info.text["encoder_identity"]:
        raise DitpipeError(f"{shards_dir} holds captions embedded by another text encoder than the run at {train_dir} "
                           "was trained with: re-run `ditpipe train` (or `dvc repro`)")
    prompts, empty = read_prompts(shards_dir), empty_caption(shards_dir)
    plan = sample_plan(len(prompts), cfg.samples, cfg.seed)
    idx, seeds = [p for p, _ in plan], [s for _, s in plan]
    texts = [prompts.captions[i] for i in idx]

    t_sample = time.perf_counter()
    images = drawer.images(prompts.cond.select(idx), empty, seeds, sampler=sampler, steps=cfg.steps,
                           guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size, progress="sample")
    t_sample = time.perf_counter() - t_sample

    backbone, reference = None, None
    Path(reference_dir).mkdir(parents=True, exist_ok=True)  # a declared output even when FID is off or impossible
    if cfg.fid:
        from ditpipe.backbones import load_inception

        backbone = load_inception(cfg.inception, device=str(drawer.device))
        reference = reference_features(prepared, cfg, backbone, Path(reference_dir))
    headline = image_metrics(images, texts, reference.features if reference else None, backbone, cfg)

    real_rows = reference_rows(prepared, "val", 0)
    real = real_images(prepared, real_rows)
    real_texts = [r["caption"] for r in real_rows]
    recon = [to_image(x) for x in reconstruct(drawer.vae, as_tensor(real, drawer.device))] if real else []
    judge_real, judge_vae = accuracy(real, real_texts), accuracy(recon, real_texts)
    sweep, sweep_images = run_sweep(drawer, prompts, plan, empty, cfg, sampler, images,
                                    reference.features if reference else None, backbone)

    protocol = {
        "n_samples": len(images), "prompts": f"val split of {shards_dir} ({len(prompts)} prompts, in key order)",
        "seed": cfg.seed, "seeds": f"{cfg.seed}..{cfg.seed + len(images) - 1}", "sampler": sampler,
        "steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "dtype": str(drawer.dtype).replace("torch.", ""),
        "weights": "EMA", "model": {"run": str(train_dir), "step": info.step, "arch": info.arch, "size": info.size,
                                    "objective": info.objective,
                                    "shards_index_sha256": info.shards_index_sha256},
        "fid": None if reference is None else {
            "backbone": cfg.inception, "backbone_sha256": backbone.identity, "features": FEATURES_PROTOCOL,
            "reference_split": reference.split, "reference_n": int(reference.features.shape[0]),
            "reference_data_version": reference.data_version, "kid_subsets": cfg.kid_subsets,
            "kid_subset_size": headline.get("kid_subset_size")},
        "clip_model": cfg.clip_model or None,
        "judge": "ditpipe.judge: image pixels + prompt only; checked on the real val images (accuracy_real)",
    }
    metrics = {
        "step": info.step, "n": len(images), "fid": headline.get("fid"), "kid": headline.get("kid"),
        "kid_std": headline.get("kid_std"), "clip_score": headline["clip_score"],
        "accuracy": headline["accuracy"], "accuracy_real": judge_real, "accuracy_vae": judge_vae,
        "train": training_figures(Path(train_dir), info), "notes": _notes(cfg, headline, reference),
    }
    grid = caption_grid(images[: cfg.grid_size], texts[: cfg.grid_size],
                        title=f"step {info.step} | {sampler} {cfg.steps} steps | cfg {cfg.guidance_scale}")
    k = min(SWEEP_GRID, len(images))
    sweep_grid = caption_grid([im for g in cfg.sweep for im in sweep_images[g][:k]],
                              [f"cfg {g}: {t}" for g in cfg.sweep for t in texts[:k]], cols=k,
                              title="guidance sweep: one row per scale") if cfg.sweep else None
    rows = [{"text": t, "seed": s, "guidance_scale": cfg.guidance_scale, "steps": cfg.steps, "sampler": sampler,
             "key": prompts.keys[p], "step": info.step} for t, (p, s) in zip(texts, plan)]
    flops_per_step = info.flops_per_image * info.batch_size
    loss_rows, eval_rows = training_curves(train_dir, flops_per_step)

    with staged_dir(out_dir) as tmp:
        write_samples(tmp / "samples", images, rows)
        grid.save(tmp / "grid.png")
        if sweep_grid is not None:
            sweep_grid.save(tmp / "sweep.png")
        write_json(tmp / "protocol.json", protocol)
    with staged_dir(plots_dir) as tmp:
        write_json(tmp / "guidance.json", sweep)
        write_json(tmp / "loss.json", loss_rows)
        write_json(tmp / "val.json", eval_rows)
        grid.save(tmp / "samples.png")
        plot_png(tmp / "curves.png", loss_rows, eval_rows, sweep)
    write_json(metrics_path, metrics)

    logged = {"fid": metrics["fid"], "kid": metrics["kid"], "clip_score": metrics["clip_score"],
              **flat_accuracy(judge_real, "judge_real_"), **flat_accuracy(judge_vae, "judge_vae_"),
              **flat_accuracy(headline["accuracy"])}
    imgs = {"samples": grid, **({"sweep": sweep_grid} if sweep_grid is not None else {})}
    child = tracking.log_evaluation(track, info.mlflow_run_id, info.step, logged, protocol, imgs,
                                    {"samples": Path(out_dir) / "samples", "plots": Path(plots_dir),
                                     "metrics": Path(metrics_path)})
    return {"metrics": metrics, "sampler": sampler, "n": len(images), "step": info.step,
            "reference_cached": bool(reference and reference.cached), "sample_seconds": round(t_sample, 2),
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir), "metrics_path": str(metrics_path),
            "mlflow_run_id": child, "index_sha256": sha256_file(f"{shards_dir}/index.json")}


def as_tensor(images: list[Image.Image], device: torch.device) -> torch.Tensor:
    """PIL images to a (N, 3, H, W) float tensor in [-1, 1]."""
    return (as_uint8(images).float() / 127.5 - 1.0).to(device)


def _notes(cfg: EvaluateConfig, headline: dict, reference: Reference | None) -> list[str]:
    notes = []
    if "fid" in headline:
        notes.append(f"FID at N={headline['n']} is biased upwards at small N: compare only at equal N; KID is "
                     "unbiased")
    elif not cfg.fid:
        notes.append("FID/KID off (evaluate.fid=false)")
    else:
        n_ref = 0 if reference is None else len(reference.features)
        notes.append(f"FID/KID not computed: they need at least 2 samples and 2 reference images, have "
                     f"{headline['n']} and {n_ref} (raise data.val_fraction or evaluate.samples, or set "
                     "evaluate.reference_split=train)")
    if headline["clip_score"] is None:
        from ditpipe.metrics import CLIP_UNAVAILABLE

        notes.append(CLIP_UNAVAILABLE)
    if headline["accuracy"] is None:
        notes.append("compositional accuracy applies to builtin:shapes prompts only")
    return notes


def summary_line(s: dict) -> str:
    m = s["metrics"]
    parts = [f"evaluate: {s['n']} samples at step {s['step']} ({s['sampler']})"]
    if m.get("fid") is not None:
        parts.append(f"FID {m['fid']:.2f} (N={s['n']}), KID {m['kid']:.4f}")
    acc = m.get("accuracy")
    if acc:
        rel = f"{acc['relation']:.0%}" if acc.get("relation") is not None else "n/a"
        parts.append(f"judged colour {acc['color']:.0%} shape {acc['shape']:.0%} relation {rel} "
                     f"count {acc['count']:.0%}")
        real = m.get("accuracy_real") or {}
        vae = m.get("accuracy_vae") or {}
        if real and vae:
            parts.append(f"(real val {real['color']:.0%}/{real['shape']:.0%}, VAE ceiling "
                         f"{vae['color']:.0%}/{vae['shape']:.0%} colour/shape)")
    if m.get("clip_score") is not None:
        parts.append(f"CLIP score {m['clip_score']:.2f}")
    return ", ".join(parts) + f" in {s['seconds']}s -> {s['metrics_path']}"
