"""Stage ``train``: a DiT-family denoiser from the shards, with exact resume.

The run folder (``paths.train``) holds ``checkpoints/checkpoint-NNNNNN`` (model, EMA, optimizer, LR
schedule, step, RNG states, data position, resolved config; written atomically, last N kept),
``metrics.jsonl`` (one object per logged step) and ``final/`` (the EMA model, ``save_pretrained``).
Running the stage again on the same folder resumes from the newest checkpoint that verifies against
its ``checksums.json``; a folder holding a run with another model, objective, optimisation or data, or a
run already past ``train.steps``, is moved aside (``<folder>.<arch>-<size>-step<N>-<time>``) and a new run
starts: nothing is deleted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ditpipe import tracking
from ditpipe.config import ModelConfig, TrackingConfig, TrainConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import (
    TMP_PREFIX,
    atomic_open,
    cache_key,
    checksum_tree,
    exclusive,
    fsync_path,
    location,
    read_json,
    read_jsonl,
    sha256_file,
    verify_tree,
    write_json,
)
from ditpipe.loader import empty_caption, load_index, make_loader
from ditpipe.models import Denoiser, RunInfo, Spec, build_model, count_parameters, forward_flops, trim_padding
from ditpipe.monitor import Monitor
from ditpipe.objectives import build_objective
from ditpipe.optim import OPTIMIZERS

# Dense bf16 peak TFLOP/s of common GPUs, for model FLOPs utilisation (MFU).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "4090": 165.0}


@dataclass
class Batch:
    """A training batch on the device, caption dropout applied."""

    x0: torch.Tensor  # (N, C, h, w) scaled latents
    emb: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L)
    pooled: torch.Tensor  # (N, D)


# ---------------------------------------------------------------- the pure core


def make_batch(raw: dict, empty: dict[str, torch.Tensor], cfg: TrainConfig, gen: torch.Generator,
               scale: float, shift: float, device: torch.device) -> Batch:
    """Resample latents from the stored posterior, scale them, drop captions; draws only from ``gen``."""
    mean, logvar = raw["mean"].float(), raw["logvar"].float()
    n = mean.shape[0]
    if "mean_flip" in raw:
        flip = (torch.rand(n, generator=gen) < cfg.flip_prob).view(-1, 1, 1, 1)
        mean = torch.where(flip, raw["mean_flip"].float(), mean)
        logvar = torch.where(flip, raw["logvar_flip"].float(), logvar)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    x0 = (z - shift) * scale
    drop = torch.rand(n, generator=gen) < cfg.caption_dropout
    emb, mask, pooled = raw["emb"].float(), raw["mask"].long(), raw["pooled"].float()
    emb = torch.where(drop.view(-1, 1, 1), empty["emb"].float(), emb)
    mask = torch.where(drop.view(-1, 1), empty["mask"].long(), mask)
    pooled = torch.where(drop.view(-1, 1), empty["pooled"].float(), pooled)
    emb, mask = trim_padding(emb, mask)
    return Batch(x0.to(device), emb.to(device), mask.to(device), pooled.to(device))


def diffusion_loss(model: Denoiser, objective, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    """MSE between the model's prediction on a noised batch and the objective's target."""
    noise = torch.randn(batch.x0.shape, generator=gen).to(batch.x0.device)
    t = objective.sample_t(batch.x0.shape[0], gen).to(batch.x0.device)
    xt = objective.noisy(batch.x0, noise, t)
    pred = model(xt, t, batch.emb, batch.mask, batch.pooled)
    return F.mse_loss(pred.float(), objective.target(batch.x0, noise, t).float())


# ---------------------------------------------------------------- build steps


def model_spec(index: dict) -> Spec:
    c, h, w = index["latents"]["latent_shape"]
    return Spec(latent_channels=c, latent_size=h, text_dim=index["text"]["dim"])


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    opt = OPTIMIZERS[cfg.optimizer](model, cfg.lr, cfg.weight_decay, cfg.muon_captions)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then constant, or a cosine to ``lr_min_ratio`` of the peak at ``cfg.steps``."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return warm
    done = min(1.0, (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1))
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def build_ema(model: torch.nn.Module, cfg: TrainConfig) -> EMAModel:
    # Warm-up: decay = 1 - (1 + step)^(-2/3), capped at ema_decay; about 0.985 after 600 steps.
    return EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # Without a GPU, cpu=True is what lets accelerate run several processes over gloo (MULTI_CPU).
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return Accelerator(mixed_precision=precision, cpu=no_gpu)


# train settings a resume may change: they do not change what a step computes, only how long and how logged
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "record_keys", "compile", "peak_tflops",
             "gradient_checkpointing", "mixed_precision", "num_workers")


def resumable(key: str) -> bool:
    return key in RESUMABLE or key.startswith("eval_")


def mutable_keys(resolved: dict) -> frozenset[str]:
    """Dotted config keys that may differ between a run's resumes (tagged in MLflow, not params)."""
    keys = {f"train.{k}" for k in resolved["train"] if resumable(k)}
    keys |= {f"{section}.{k}" for section in ("evaluate", "paths", "tracking") for k in resolved.get(section, {})}
    return frozenset(keys)


def run_fingerprint(resolved: dict, index_hash: str) -> str:
    """What must match to resume: model, objective, optimisation and data (not steps or logging)."""
    train = {k: v for k, v in resolved["train"].items() if not resumable(k)}
    return cache_key(json.dumps(resolved["model"], sort_keys=True), json.dumps(train, sort_keys=True), index_hash)


def peak_flops(device: torch.device, given_tflops: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the given figure, else the table for known GPUs, else 0 (unknown)."""
    if given_tflops > 0:
        return given_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 0.0


# ---------------------------------------------------------------- checkpoints


def plain_model(acc: Accelerator, model) -> Denoiser:
    """The Denoiser without DDP or torch.compile wrappers: checkpoint keys stay the same either way."""
    return acc.unwrap_model(model, keep_torch_compile=False)


def shard(model: Denoiser) -> None:
    """FSDP2: each block of the model's block lists, then the whole model, sharded over every process."""
    from torch.distributed.fsdp import fully_shard

    for child in model.inner.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(model)


def full_state(acc: Accelerator, model, ema: EMAModel, opt, fsdp: bool) -> tuple[dict, dict, dict]:
    """(model, optimizer, EMA) state dicts as whole tensors, the same files with or without FSDP. Under FSDP
    every process must call it (the shards are gathered); the main process gets the whole state."""
    if not fsdp:
        return plain_model(acc, model).state_dict(), opt.state_dict(), ema.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ema_state = ema.state_dict()
    ema_state["shadow_params"] = [p.full_tensor().cpu() for p in ema.shadow_params]
    return get_model_state_dict(model, options=whole), get_optimizer_state_dict(model, opt, options=whole), ema_state


def load_full_state(model, ema: EMAModel, opt, weights: dict, state: dict, fsdp: bool) -> None:
    """The inverse of :func:`full_state`: every process loads the whole state and keeps its shard."""
    if not fsdp:
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import distribute_tensor

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=options)
    ema.load_state_dict(state["ema"])
    ema.shadow_params = [distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
                         for full, p in zip(ema.shadow_params, model.parameters())]


def checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob("checkpoint-*")) if root.exists() else []


def rng_state(gen: torch.Generator) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def writing(tmp: Path, run_dir: Path) -> Iterator[None]:
    """Remove a half-written ``tmp`` on failure and say what failed in one line (torch and safetensors
    report a full disk as 'unexpected pos 576 vs 534' or a serializing error, not as an OSError)."""
    try:
        yield
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free / 1e6
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DitpipeError(f"could not write {tmp.name.removeprefix(TMP_PREFIX)} in {run_dir}: {first} "
                           f"({free:.0f} MB free there; free space or point paths.train elsewhere: the earlier "
                           "checkpoints are intact)") from exc


def save_checkpoint(acc: Accelerator, run_dir: Path, step: int, model, ema: EMAModel, opt, sched,
                    gen: torch.Generator, meta: dict, keep: int, fsdp: bool = False) -> None:
    """Write checkpoint-STEP under a temp name, then rename; every rank adds its RNG state, and
    ``checksums.json`` lists every file's sha256 so a resume can tell a whole checkpoint from a damaged one."""
    final = run_dir / "checkpoints" / f"checkpoint-{step:06d}"
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(gen), tmp / f"rng-rank{acc.process_index}.pt")
    weights, opt_state, ema_state = full_state(acc, model, ema, opt, fsdp)  # under FSDP: every rank gathers
    acc.wait_for_everyone()
    if acc.is_main_process:
        with writing(tmp, run_dir):
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
            torch.save({"optimizer": opt_state, "scheduler": sched.state_dict(), "ema": ema_state}, tmp / "state.pt")
            write_json(tmp / "trainer.json", {**meta, "step": step})
            checksum_tree(tmp)  # every file flushed to disk and its sha256 recorded before the rename publishes it
        os.replace(tmp, final)
        fsync_path(final.parent)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def load_checkpoint(path: Path, acc: Accelerator, model, ema: EMAModel, opt, sched, gen: torch.Generator,
                    fsdp: bool = False) -> dict:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    load_full_state(acc.unwrap_model(model), ema, opt, load_file(str(path / "model.safetensors")), state, fsdp)
    sched.load_state_dict(state["scheduler"])
    rng = path / f"rng-rank{acc.process_index}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True), gen)
    return read_json(path / "trainer.json")


@contextlib.contextmanager
def ema_weights(acc: Accelerator, model, ema: EMAModel, rebuild=None) -> Iterator[Denoiser | None]:
    """The plain model with the EMA weights swapped in for the block; the trained weights come back after.
    Under FSDP (``rebuild`` makes an unsharded model) every process enters: the EMA shards are gathered
    and the main process gets a whole copy (the others None)."""
    if rebuild is not None:
        whole = [p.full_tensor() for p in ema.shadow_params]
        if not acc.is_main_process:
            yield None
            return
        copy = rebuild()
        with torch.no_grad():
            for p, w in zip(copy.parameters(), whole):
                p.copy_(w)
        yield copy.eval()
        return
    inner = plain_model(acc, model)
    ema.store(inner.parameters())
    ema.copy_to(inner.parameters())
    try:
        yield inner
    finally:
        ema.restore(inner.parameters())


def save_final(acc: Accelerator, run_dir: Path, model, ema: EMAModel, info: RunInfo, rebuild=None) -> Path:
    """The EMA weights as a diffusers model folder, plus what evaluation needs to use it."""
    final = run_dir / "final"
    gather = rebuild is not None or acc.is_main_process  # under FSDP every rank takes part in the gather
    with ema_weights(acc, model, ema, rebuild) if gather else contextlib.nullcontext() as inner:
        if acc.is_main_process:
            tmp = final.with_name(f"{TMP_PREFIX}final")
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(tmp, run_dir):
                inner.inner.save_pretrained(tmp)
                info.write(tmp)
                checksum_tree(tmp)  # evaluate, export and generate check final/ against it
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    acc.wait_for_everyone()
    return final


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint we resume from: those steps are trained again."""
    if path.exists():
        rows = [r for r in read_jsonl(path) if r["step"] <= step]
        with atomic_open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- logging


class StepLog:
    """Per-window metrics: one row every ``log_every`` steps to metrics.jsonl and MLflow (main process only).

    The loss is summed on the device and read once per window, so logging does not sync every step.
    """

    def __init__(self, acc: Accelerator, cfg: TrainConfig, run_dir: Path, tracker, flops_per_image: float,
                 step: int):
        self.acc, self.cfg, self.tracker = acc, cfg, tracker
        self.metrics = run_dir / "metrics.jsonl"
        self.keys = run_dir / f"keys-rank{acc.process_index}.jsonl"
        self.flops_per_image, self.peak = flops_per_image, peak_flops(acc.device, cfg.peak_tflops)
        if acc.is_main_process:
            truncate_metrics(self.metrics, step)
            truncate_metrics(run_dir / "eval.jsonl", step)
        if cfg.record_keys:
            truncate_metrics(self.keys, step)
        acc.wait_for_everyone()
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.steps, self.start = torch.zeros((), device=self.acc.device), 0, time.perf_counter()

    def record(self, step: int, loss: torch.Tensor, keys: list[str]) -> None:
        self.loss_sum += loss.detach().float()
        self.steps += 1
        if self.cfg.record_keys:
            with open(self.keys, "a") as f:
                f.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def flush(self, step: int, lr: float, grad_norm, ema_decay: float) -> dict:
        acc, n = self.acc, self.acc.num_processes
        images_s = self.steps * self.cfg.batch_size * n / (time.perf_counter() - self.start)
        row = {"step": step, "loss": acc.reduce(self.loss_sum / self.steps, "mean").item(), "lr": lr,
               "images_per_s": images_s, "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "ema_decay": ema_decay, "memory_mb": memory_mb(acc.device),
               "train_flops": step * self.cfg.batch_size * n * self.flops_per_image}
        if self.peak:
            row["mfu"] = images_s * self.flops_per_image / (self.peak * n)
        if acc.is_main_process:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log_metrics(row, step)
        self._reset()
        return row

    def last(self) -> dict:
        rows = list(read_jsonl(self.metrics)) if self.metrics.exists() else []
        return rows[-1] if rows else {}


# ---------------------------------------------------------------- the loop


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a missing or damaged file), or None when it verifies."""
    if (path / "checksums.json").exists():
        return verify_tree(path)
    try:  # written before checkpoints carried checksums: it verifies if every part loads
        read_json(path / "trainer.json")
        load_file(str(path / "model.safetensors"))
        torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load means: do not resume from it
        return f"it does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return None


def set_aside(path: Path, label: str) -> Path:
    """Rename ``path`` to ``<path>.<label>-<time>`` beside it (never delete a run); return the new path."""
    dest = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name}-{n}"), n + 1
    os.replace(path, dest)
    return dest


def changed_settings(old: dict, new: dict) -> list[str]:
    """The dotted keys of the model and train sections whose values differ between two resolved configs."""
    return [f"{section}.{k}" for section in ("model", "train")
            for k in sorted(set(old.get(section, {})) | set(new.get(section, {})))
            if old.get(section, {}).get(k) != new.get(section, {}).get(k)]


def resume_point(acc: Accelerator, run_dir: Path, fingerprint: str, resolved: dict) -> Path | None:
    """The newest checkpoint of this run that verifies, or None to start fresh.

    Damaged checkpoints are moved aside (``damaged-checkpoint-N``) with a line saying why; a folder that holds
    a run of another model, objective, optimisation or data, or one already past ``train.steps``, is moved
    aside whole, under a name that says which run it was. Nothing is deleted.
    """
    if acc.is_main_process:
        for path in reversed(checkpoints(run_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                break
            os.replace(path, path.with_name(f"damaged-{path.name}"))
            print(f"train: skipping {path}: {problem}; kept as damaged-{path.name}", flush=True)
        found = checkpoints(run_dir)
        old = read_json(found[-1] / "trainer.json") if found else {}
        m, t = old.get("config", {}).get("model", {}), old.get("config", {}).get("train", {})
        label = f"{m.get('arch', 'run')}-{str(m.get('size', '')).replace('/', '_')}-step{old.get('step', 0)}"
        if found and old.get("fingerprint") != fingerprint:
            diff = [k for k in changed_settings(old.get("config", {}), resolved)
                    if not (k.startswith("train.") and resumable(k[len("train."):]))]
            diff = diff or ["the training data (shards index)"]
            moved = set_aside(run_dir, label)
            print(f"train: {run_dir} held a run with other settings ({', '.join(diff[:6])}); moved it to {moved} "
                  f"(lr {t.get('lr')}, {t.get('objective')}) and starting over", flush=True)
        elif found and old.get("step", 0) > resolved["train"]["steps"]:
            # A shorter run is another schedule, not a point on this one: it is trained, not cut from this run.
            moved = set_aside(run_dir, label)
            print(f"train: {run_dir} held a run at step {old.get('step')}, past train.steps="
                  f"{resolved['train']['steps']}; moved it to {moved} and starting over", flush=True)
        elif not found and run_dir.exists() and any(run_dir.glob("checkpoints/damaged-*")):
            moved = set_aside(run_dir, "damaged")
            print(f"train: no checkpoint in {run_dir} verifies; moved it to {moved} and starting over", flush=True)
    acc.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoints(run_dir)
    return found[-1] if found else None


def eval_due(cfg: TrainConfig, step: int) -> bool:
    """Whether an in-run evaluation falls on ``step`` (the same answer on every rank)."""
    return cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)


def optimizer_step(acc: Accelerator, model, opt, sched, ema: EMAModel, loss: torch.Tensor, cfg: TrainConfig):
    """Backward, clip, step, schedule, EMA; returns the pre-clip gradient norm (or None)."""
    acc.backward(loss)
    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    ema.step(plain_model(acc, model).parameters())
    return grad_norm


def run(model_cfg: ModelConfig, cfg: TrainConfig, track: TrackingConfig, shards_dir: str | Path,
        out_dir: str | Path, resolved: dict, vae_dir: str | Path | None = None) -> dict:
    """Train (or resume) into ``out_dir``; return a summary. ``vae_dir`` lets in-run evaluations draw images.

    The main process holds the run folder's lock throughout: a second ``train`` on it fails at once naming
    this one (or waits with --wait) instead of mixing two runs in one folder.
    """
    acc = build_accelerator(cfg)
    with exclusive(out_dir) if acc.is_main_process else contextlib.nullcontext():
        return _run(acc, model_cfg, cfg, track, location(shards_dir), Path(out_dir), resolved, vae_dir)


def _run(acc: Accelerator, model_cfg: ModelConfig, cfg: TrainConfig, track: TrackingConfig, shards_dir: str | Path,
         run_dir: Path, resolved: dict, vae_dir: str | Path | None) -> dict:
    t_start = time.perf_counter()
    tracking.check_reachable(track)  # every check that can fail comes before the run folder is touched
    index, index_hash = load_index(shards_dir), sha256_file(f"{shards_dir}/index.json")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # same init on every rank
    spec = model_spec(index)
    options = {"tokens": model_cfg.tokens, "mlp_conv": model_cfg.mlp_conv, "caption_layers": model_cfg.caption_layers}
    model = build_model(model_cfg.arch, model_cfg.size, spec, **options)  # a bad size fails here, not later
    n_params = count_parameters(model)
    flops_per_image = 3 * forward_flops(model, spec, index["text"]["max_length"])  # forward + backward
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    fsdp = cfg.fsdp and acc.num_processes > 1  # one process has nothing to shard over
    rebuild = None
    if fsdp:
        model.to(acc.device)
        shard(model)  # before the optimizer and the EMA, so that both hold shards too

        def rebuild() -> Denoiser:  # an unsharded model for the main process's evaluations and final/
            return build_model(model_cfg.arch, model_cfg.size, spec, **options).to(acc.device)
    ema = build_ema(model, cfg)
    opt, sched = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
    fingerprint = run_fingerprint(resolved, index_hash)
    latest = resume_point(acc, run_dir, fingerprint, resolved)
    step, meta = 0, {}
    if latest is not None:
        meta = load_checkpoint(latest, acc, model, ema, opt, sched, gen, fsdp)
        step = meta["step"]
        if (meta["world_size"], meta["num_workers"]) != (acc.num_processes, cfg.num_workers):
            print("train: resuming with a different process or worker count: the data order will differ "
                  "from an uninterrupted run", flush=True)
    ema.to(acc.device)
    if not fsdp:  # DDP through accelerate; FSDP2 is applied above (accelerate runs FSDP on GPUs only)
        model, opt = acc.prepare(model, opt)
    if cfg.compile:
        model = torch.compile(model)

    tracker = tracking.start(track, run_dir, resolved, index_hash, meta.get("mlflow_run_id"), acc.is_main_process,
                             default_name=f"{model_cfg.arch}-{model_cfg.size.replace('/', '_')}-{cfg.objective}",
                             mutable=mutable_keys(resolved))
    with tracker.failed_on_error():  # a crash or Ctrl-C does not leave the MLflow run RUNNING
        prior_seconds = float(meta.get("train_seconds", 0.0))  # loop time of the runs this one resumes
        meta = {"fingerprint": fingerprint, "world_size": acc.num_processes, "num_workers": cfg.num_workers,
                "config": resolved, "shards_index_sha256": index_hash, "mlflow_run_id": tracker.run_id}
        steplog = StepLog(acc, cfg, run_dir, tracker, flops_per_image, step)
        objective = build_objective(cfg.objective, cfg.logit_mean, cfg.logit_std)
        empty = empty_caption(shards_dir)
        scale = float(index["latents"]["scaling_factor"])
        shift = float(index["latents"].get("shift_factor") or 0.0)
        data = iter(make_loader(shards_dir, "train", cfg.batch_size, num_workers=cfg.num_workers,
                                shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, rank=acc.process_index,
                                world_size=acc.num_processes, infinite=True, skip_batches=step))
        monitor = None
        if acc.is_main_process and cfg.eval_every:
            monitor = Monitor(cfg, shards_dir, vae_dir, index, objective, run_dir, tracker,
                              flops_per_image * cfg.batch_size * acc.num_processes)
        start_step, t_loop = step, time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step",
                   disable=None if acc.is_main_process else True)
        model.train()
        while step < cfg.steps:
            raw = next(data)
            batch = make_batch(raw, empty, cfg, gen, scale, shift, acc.device)
            with acc.autocast():
                loss = diffusion_loss(model, objective, batch, gen)
            grad_norm = optimizer_step(acc, model, opt, sched, ema, loss, cfg)
            step += 1
            steplog.record(step, loss, raw["key"])
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.steps:
                row = steplog.flush(step, sched.get_last_lr()[0], grad_norm, ema.get_decay(ema.optimization_step))
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if monitor is not None and monitor.due(step) or fsdp and eval_due(cfg, step):  # FSDP: all ranks
                with ema_weights(acc, model, ema, rebuild) as inner:
                    row = monitor(inner, empty, step) if monitor is not None and monitor.due(step) else None
                model.train()
                if row is not None:
                    bar.write(f"train: step {step} val loss {row['val_loss']:.4f}"
                              + "".join(f", {k[4:]} {v:.0%}" for k, v in row.items() if k.startswith("acc_")))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                meta["samples_per_rank"] = step * cfg.batch_size  # the data position a resume skips to
                meta["train_seconds"] = prior_seconds + time.perf_counter() - t_loop
                save_checkpoint(acc, run_dir, step, model, ema, opt, sched, gen, meta, cfg.keep_checkpoints, fsdp)
        bar.close()
        info = RunInfo(arch=model_cfg.arch, size=model_cfg.size, objective=cfg.objective, step=step, spec=spec,
                       latents=index["latents"], text=index["text"], parameters=n_params, shards=str(shards_dir),
                       shards_index_sha256=index_hash, config=resolved, mlflow_run_id=tracker.run_id,
                       flops_per_image=flops_per_image, batch_size=cfg.batch_size * acc.num_processes,
                       train_seconds=round(prior_seconds + time.perf_counter() - t_loop, 2))
        final = save_final(acc, run_dir, model, ema, info, rebuild)
        tracker.finish(final if acc.is_main_process else None)
    last = steplog.last()
    return {"steps": step, "trained": step - start_step, "resumed_from": start_step, "loss": last.get("loss"),
            "images_per_s": last.get("images_per_s"), "parameters": n_params, "arch": model_cfg.arch,
            "size": model_cfg.size, "objective": cfg.objective, "processes": acc.num_processes, "fsdp": fsdp,
            "gflops_per_image": flops_per_image / 3 / 1e9, "seconds": round(time.perf_counter() - t_start, 2),
            "out": str(run_dir), "mlflow_run_id": tracker.run_id}


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def summary_line(s: dict) -> str:
    resumed = f", resumed from step {s['resumed_from']}" if s["resumed_from"] else ""
    loss = f"{s['loss']:.4f}" if s.get("loss") is not None else "n/a"
    rate = f"{s['images_per_s']:.0f} img/s" if s.get("images_per_s") else "n/a"
    return (f"train: {s['arch']} {s['size']} ({s['parameters'] / 1e6:.2f}M params, {s['objective']}) "
            f"{s['trained']} steps to step {s['steps']}{resumed} on {s['processes']} process(es)"
            f"{' (FSDP: sharded)' if s.get('fsdp') else ''}, loss {loss}, "
            f"{rate}, in {s['seconds']}s -> {s['out']}/final")
