"""One typed config tree, loaded once from ``params.yaml``.

Each stage has a frozen dataclass; every field carries a one-line help text in its metadata.
Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the dotted key,
before any stage does work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ditpipe.errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16")
STORAGE_DTYPES = ("float32", "float16")


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help line (lists become immutable tuples)."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class PathsConfig:
    """Where each stage writes its output (relative to the working directory)."""

    prepared: str = opt("artifacts/prepared", "normalized images, samples.jsonl and report.json")
    vae: str = opt("artifacts/vae", "the diffusers AutoencoderKL folder used for latents")
    latents: str = opt("artifacts/latents", "per-sample VAE posterior cache and its index")
    text: str = opt("artifacts/text", "per-caption text embedding cache and its index")
    shards: str = opt("artifacts/shards", "webdataset tar shards (train/val) and index.json")
    train: str = opt("artifacts/train", "the training run: checkpoints, metrics.jsonl, final EMA model")
    evaluate: str = opt("artifacts/evaluate", "samples (imagefolder), grids and the evaluation protocol")
    reference: str = opt("artifacts/reference", "cached Inception features of reference images, per data version")
    metrics: str = opt("artifacts/metrics.json", "evaluation metrics (dvc metrics show)")
    plots: str = opt("artifacts/plots", "plot data and images (dvc plots show)")
    export: str = opt("artifacts/export", "the run as one diffusers pipeline folder with a model card")


@dataclass(frozen=True)
class DataConfig:
    """The ``prepare`` stage: where images and captions come from and how they are normalized."""

    source: str = opt("builtin:shapes", "builtin:shapes, an imagefolder, webdataset tars or parquet (path/fsspec URL)")
    format: Literal["auto", "shapes", "imagefolder", "webdataset", "parquet"] = opt(
        "auto", "dataset format; auto detects it from the source"
    )
    resolution: int = opt(32, "side of the square training images in pixels (multiple of 8)")
    count: int = opt(2000, "number of images builtin:shapes generates")
    limit: int = opt(0, "read at most this many source records (0 = all)")
    seed: int = opt(0, "seed for builtin:shapes")
    val_fraction: float = opt(0.05, "fraction of samples put in the val split (by key hash)")
    min_size: int = opt(16, "reject images whose shorter side is below this many pixels")
    max_pixels: int = opt(50_000_000, "reject images with more pixels than this (decompression bombs)")
    background: str = opt("white", "colour transparent pixels are composited over (any PIL colour)")
    caption_column: str = opt("text", "caption field in metadata.jsonl/.csv, json sidecars and parquet")
    image_column: str = opt("image", "image bytes column in parquet sources")
    file_column: str = opt("file_name", "image path field in imagefolder metadata")

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        _check_range("data.val_fraction", self.val_fraction, 0.0, 1.0)
        _check_min("data.count", self.count, 1)
        _check_min("data.limit", self.limit, 0)
        _check_min("data.min_size", self.min_size, 1)
        _check_min("data.max_pixels", self.max_pixels, 1)
        from PIL import ImageColor

        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            msg = f"data.background must be a PIL colour name or #rrggbb, got {self.background!r}"
            raise ConfigError(msg) from None


@dataclass(frozen=True)
class VaeConfig:
    """The ``vae`` stage: a pretrained AutoencoderKL, or a small one trained on the prepared images."""

    pretrained: str = opt("", "hub id or local path of a diffusers AutoencoderKL; empty trains one")
    subfolder: str = opt("", "subfolder of `pretrained` holding the VAE (e.g. 'vae' in a pipeline repo)")
    latent_channels: int = opt(8, "latent channels of the trained VAE (8 at /2 kept shapes the judge reads on both "
                                  "tuning seeds; 4 did on one)")
    block_out_channels: tuple[int, ...] = opt([16, 32], "channels per VAE block; each after the first halves (two "
                                              "blocks = /2: 32px shapes keep their corners, /4 blurred them)")
    layers_per_block: int = opt(1, "resnet layers per block of the trained VAE")
    mid_attention: bool = opt(False, "self-attention in the VAE's middle block (diffusers' default is on; off is 22% "
                              "faster per step at 32px with the same reconstructions)")
    steps: int = opt(1400, "optimizer steps when training the VAE (1,000 left shape at 91% judged, 1,400 reach 95%)")
    batch_size: int = opt(16, "batch size when training the VAE (16 beat 32 at equal time)")
    lr: float = opt(2e-3, "AdamW learning rate when training the VAE")
    kl_weight: float = opt(1e-6, "weight of the KL term against pixel MSE")
    seed: int = opt(0, "seed for VAE training")
    scaling_factor: float = opt(0.0, "latent scaling factor; 0 takes the VAE's own or measures 1/std")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ConfigError("vae.block_out_channels must list at least one channel count")
        for name in ("latent_channels", "layers_per_block", "steps", "batch_size"):
            _check_min(f"vae.{name}", getattr(self, name), 1)
        _check_min("vae.scaling_factor", self.scaling_factor, 0.0)
        _check_device("vae.device", self.device)


@dataclass(frozen=True)
class LatentsConfig:
    """The ``latents`` stage: batched VAE encoding into a content-keyed cache."""

    batch_size: int = opt(64, "images per VAE forward pass")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", "VAE compute dtype")
    storage_dtype: Literal["float32", "float16"] = opt("float32", "dtype of the stored mean/logvar")
    flip: bool = opt(False, "also store the horizontally flipped view")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        _check_min("latents.batch_size", self.batch_size, 1)
        _check_device("latents.device", self.device)


@dataclass(frozen=True)
class TextConfig:
    """The ``text`` stage: caption embeddings, each unique caption encoded once."""

    encoder: str = opt("all-MiniLM-L6-v2", "registry name, hub id or local path of a transformers text encoder")
    max_length: int = opt(32, "tokens per caption (padded/truncated)")
    dtype: Literal["float32", "float16"] = opt("float32", "compute and storage dtype of the embeddings")
    batch_size: int = opt(128, "captions per encoder forward pass")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        _check_min("text.max_length", self.max_length, 1)
        _check_min("text.batch_size", self.batch_size, 1)
        _check_device("text.device", self.device)


@dataclass(frozen=True)
class ShardsConfig:
    """The ``shards`` stage: webdataset tars bounded by sample count and bytes."""

    max_samples: int = opt(256, "most samples in one shard")
    max_bytes: int = opt(64_000_000, "most bytes in one shard (a single larger sample still gets its own)")
    seed: int = opt(0, "seed of the train split's write order")

    def __post_init__(self) -> None:
        _check_min("shards.max_samples", self.max_samples, 1)
        _check_min("shards.max_bytes", self.max_bytes, 1024)


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser: architecture and size preset."""

    arch: Literal["dit", "cross", "mmdit", "unet"] = opt(
        "dit", "dit (adaLN-Zero), cross (PixArt cross-attention), mmdit (SD3 joint attention) or unet (dit is the "
        "CPU default: at equal time it beat cross and mmdit on the tuning seed)"
    )
    size: str = opt("XXS/2", "PRESET/PATCH: T, XXS, XS (CPU) or DiT's S, B, L, XL; patch 1, 2, 4 or 8 (XXS/2: 64 "
                    "tokens of 4x4 pixels on the default 16x16 latents; on the tuning seed it drew one object where "
                    "asked twice as often as XS/4's 16 tokens at 1,000 steps, at 1.1x the time)")
    tokens: bool = opt(True, "dit only: every block also cross-attends to the caption's token embeddings, not only the "
                       "pooled vector, which mostly loses word order (tuning seed, XXS/2 at 1,000 steps: colour 67 -> "
                       "75%, relation 24 -> 34%, at 1.3x the time); cross, mmdit and unet always read the tokens")
    mlp_conv: int = opt(3, "dit only: kernel of a depthwise convolution inside every block's MLP, 0 = none (a "
                        "locality prior; tuning seed, XXS/2 + tokens at 1,500 steps, 448 samples: shape 17 -> 25%, "
                        "val loss 0.480 -> 0.446; 1.15x the time of a bare step, 1.03x in the training loop; 5 x 5 "
                        "did no better)")
    caption_layers: int = opt(2, "dit with tokens only: transformer layers over the caption's tokens before the "
                              "blocks read them (Lumina-Image 2.0's context refiner), 0 = none (tuning seed, 1,500 "
                              "steps, 448 samples: colour 72 -> 81%, shape 24 -> 27%, relation 30 -> 36%, count "
                              "58 -> 61%, at 1.1x the time of a bare step)")

    def __post_init__(self) -> None:
        from ditpipe.presets import parse_size

        parse_size(self.size)
        if self.mlp_conv < 0 or self.mlp_conv % 2 == 0 and self.mlp_conv:
            raise ConfigError(f"model.mlp_conv must be 0 (none) or an odd kernel size such as 3, got {self.mlp_conv}")
        if self.caption_layers < 0:
            raise ConfigError(f"model.caption_layers must be >= 0, got {self.caption_layers}")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` stage: objective, optimizer, EMA, checkpoints and logging."""

    objective: Literal["ddpm", "rectified_flow"] = opt("rectified_flow", "ddpm (epsilon) or rectified_flow (velocity)")
    steps: int = opt(1600, "optimizer steps in total (raise it and re-run to train on; 1,600: what the default "
                     "model fits in the 10-minute default run with Muon, whose bare step costs about 1.1x AdamW's "
                     "on a CPU)")
    batch_size: int = opt(32, "samples per step on each process (32: at equal time as good as 64 on a CPU, with "
                          "twice the updates)")
    lr: float = opt(2e-3, "peak learning rate (2e-3 for the 4M CPU default: 5e-4 learned about half as fast; "
                    "lower it for big models); Muon's steps are scaled to the size of AdamW's at this rate")
    optimizer: Literal["muon", "adamw"] = opt(
        "muon", "muon: Muon (orthogonalised momentum) on the weight matrices inside the blocks (and see "
        "muon_captions) and AdamW on the rest (tuning seed, 1,500 steps, 448 samples, against adamw: colour 81 -> "
        "86%, shape 27 -> 33%, relation 36 -> 40%, count 61 -> 68%, val loss 0.446 -> 0.433); or adamw everywhere "
        "(with fsdp, which splits the matrices)")
    muon_captions: bool = opt(True, "with muon: also the caption projections' linear layers (dense inputs from a "
                              "frozen encoder, not an embedding table); tuning seed, 1,500 steps, 448 samples, two "
                              "training seeds: shape 32 -> 38-39%, colour, relation and count within noise; false: "
                              "AdamW there, as before")
    logit_mean: float = opt(1.0, "rectified_flow: mean of the logit-normal training timesteps (> 0 trains noisier "
                            "steps more, where layout and colour are decided; 1.0 beat SD3's 0 on the tuning seed)")
    logit_std: float = opt(1.0, "rectified_flow: spread of the logit-normal training timesteps (SD3: 0, 1)")
    warmup_steps: int = opt(50, "linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = opt("cosine", "after warm-up: constant, or cosine decay to "
                                                    "lr_min_ratio x lr at train.steps (raising steps later "
                                                    "stretches the curve)")
    lr_min_ratio: float = opt(0.1, "cosine schedule: the learning rate at the last step, as a fraction of the peak")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW's and Muon's)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    ema_decay: float = opt(0.9999, "EMA decay, reached gradually (warm-up) so short runs still get a usable EMA")
    caption_dropout: float = opt(0.1, "fraction of captions replaced by the empty caption (for CFG)")
    flip_prob: float = opt(0.5, "chance of using the flipped latents when the shards have them")
    seed: int = opt(0, "seed of model init, data order and noise")
    checkpoint_every: int = opt(200, "steps between checkpoints")
    keep_checkpoints: int = opt(3, "checkpoints kept (oldest deleted first)")
    log_every: int = opt(10, "steps between metric logs (metrics.jsonl and MLflow)")
    num_workers: int = opt(0, "DataLoader workers per process")
    shuffle_buffer: int = opt(1000, "samples in the loader's shuffle buffer")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "auto = bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    compile: bool = opt(False, "torch.compile the model")
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over the processes (torch FSDP2) "
                            "instead of a full copy per process (DDP); for models one GPU cannot hold")
    peak_tflops: float = opt(0.0, "device peak TFLOP/s for MFU; 0 looks up known GPUs")
    record_keys: bool = opt(False, "write the sample keys of every step to keys-rank<N>.jsonl (audits data order)")
    eval_every: int = opt(800, "steps between in-run evaluations: val loss, a sample grid, judge accuracy (0 = off)")
    eval_samples: int = opt(16, "val prompts sampled at each in-run evaluation (EMA weights)")
    eval_steps: int = opt(20, "sampler steps of the in-run sample grid")
    eval_guidance_scale: float = opt(4.0, "classifier-free guidance scale of the in-run sample grid")

    def __post_init__(self) -> None:
        for name in ("eval_every", "eval_samples"):
            _check_min(f"train.{name}", getattr(self, name), 0)
        _check_min("train.eval_steps", self.eval_steps, 1)
        _check_min("train.eval_guidance_scale", self.eval_guidance_scale, 1.0)
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check_min(f"train.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "num_workers", "shuffle_buffer"):
            _check_min(f"train.{name}", getattr(self, name), 0)
        _check_min("train.lr", self.lr, 0.0)
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("train.optimizer=muon orthogonalises whole weight matrices and train.fsdp=true splits "
                              "them over the processes: use train.optimizer=adamw with fsdp")
        if self.logit_std <= 0:
            raise ConfigError(f"train.logit_std must be > 0, got {self.logit_std}")
        _check_range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        _check_range("train.lr_min_ratio", self.lr_min_ratio, 0.0, 1.0)
        _check_range("train.caption_dropout", self.caption_dropout, 0.0, 1.0)
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"train.flip_prob must be in [0, 1], got {self.flip_prob}")


# Which objective each sampler solves (the samplers themselves are in ditpipe.sampling).
SAMPLER_OBJECTIVES = {"euler": "rectified_flow", "heun": "rectified_flow", "ddpm": "ddpm", "ddim": "ddpm",
                      "dpmpp": "ddpm"}


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` stage: sample the val prompts, then FID/KID, CLIP score and compositional accuracy."""

    samples: int = opt(0, "images to sample, cycling the val prompts with new seeds (0 = one per val prompt)")
    sampler: Literal["auto", "euler", "heun", "ddpm", "ddim", "dpmpp"] = opt(
        "auto", "auto (euler for rectified_flow, dpmpp for ddpm), euler, heun, ddpm, ddim or dpmpp")
    steps: int = opt(30, "sampler steps (heun calls the model twice per step)")
    guidance_scale: float = opt(4.0, "classifier-free guidance scale of the samples, grid and headline metrics")
    sweep: tuple[float, ...] = opt([1.0, 2.0, 4.0, 6.0], "guidance scales of the metric-vs-guidance plot ([] = none)")
    sweep_fid: bool = opt(False, "also FID/KID at every sweep scale (one Inception pass of all samples per scale)")
    seed: int = opt(0, "sample i starts from seed + i: images do not depend on batch size or device")
    batch_size: int = opt(64, "prompts per sampling batch (twice that many model rows with guidance)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "auto = bf16 on GPU, fp32 on CPU")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    fid: bool = opt(True, "compute FID and KID (Inception runs about 5 images/s on 2 CPU cores)")
    inception: str = opt("fid-inception", "fid-inception (the standard FID InceptionV3, offline) or a TorchScript path")
    reference_split: Literal["val", "train", "all"] = opt("val", "prepared images FID/KID compare against")
    reference_count: int = opt(0, "most reference images (0 = the whole split)")
    kid_subset_size: int = opt(1000, "KID subset size (capped at the sample counts)")
    kid_subsets: int = opt(100, "KID subsets averaged")
    clip_model: str = opt("", "CLIP hub id or local path for CLIP score; empty = none (no CLIP installs offline)")
    grid_size: int = opt(16, "images in the sample grid")

    def __post_init__(self) -> None:
        for name in ("samples", "reference_count"):
            _check_min(f"evaluate.{name}", getattr(self, name), 0)
        for name in ("steps", "batch_size", "kid_subset_size", "kid_subsets", "grid_size"):
            _check_min(f"evaluate.{name}", getattr(self, name), 1)
        _check_min("evaluate.guidance_scale", self.guidance_scale, 1.0)
        for i, g in enumerate(self.sweep):
            _check_min(f"evaluate.sweep[{i}]", g, 1.0)
        _check_device("evaluate.device", self.device)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = opt(True, "log runs to MLflow")
    uri: str = opt("", "tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")
    experiment: str = opt("ditpipe", "MLflow experiment name")
    run_name: str = opt("", "MLflow run name; empty = ARCH-SIZE-OBJECTIVE")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the per-sample data stages (``prepare``, ``latents``, ``text``) run their parts. Not a DVC dependency: the
    outputs are byte-for-byte the same on any engine."""

    engine: Literal["local", "dask"] = opt("local", "local = in this process; dask = parts as Dask tasks")
    address: str = opt("", "Dask scheduler address (tcp://host:8786); empty = a local cluster of `workers`")
    workers: int = opt(2, "worker processes of the local Dask cluster (torch threads split among them)")
    parts: int = opt(16, "parts by key hash: a sample's part does not change when the dataset grows")
    gpus_per_part: float = opt(0.0, "Dask resource GPU each part asks for (start GPU workers with "
                                    "--resources GPU=1); 0 = none")

    def __post_init__(self) -> None:
        _check_min("cluster.workers", self.workers, 1)
        _check_min("cluster.parts", self.parts, 1)
        _check_min("cluster.gpus_per_part", self.gpus_per_part, 0.0)


@dataclass(frozen=True)
class Config:
    """The whole params.yaml."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        sampler = self.evaluate.sampler
        if sampler != "auto" and SAMPLER_OBJECTIVES[sampler] != self.train.objective:
            fits = [k for k, v in SAMPLER_OBJECTIVES.items() if v == self.train.objective]
            raise ConfigError(f"evaluate.sampler={sampler} samples {SAMPLER_OBJECTIVES[sampler]} models but "
                              f"train.objective is {self.train.objective}: use auto or one of {', '.join(fits)}")


def _check_min(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ConfigError(f"{key} must be in [{low}, {high}), got {value}")


def _check_device(key: str, value: str) -> None:
    base = value.split(":", 1)[0]
    if base not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


# ---------------------------------------------------------------- loading and checking


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (lists become tuples)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key} has the wrong type: got {value!r}")
    if origin is tuple:
        (inner, _) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (known keys: {', '.join(sorted(where + n for n in names))})"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], key)
        else:
            kwargs[f.name] = _coerce(key, tp, raw[f.name])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects a dotted key like data.resolution, got {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with dotted ``key=value`` overrides applied."""
    raw = _deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def _deepcopy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deepcopy(v) for k, v in raw.items()}
    return raw


def load_config(params: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params`` (missing file = all defaults), apply overrides and check everything."""
    raw: Any = {}
    if params is not None:
        path = Path(params)
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        elif str(params) != "params.yaml":
            raise ConfigError(f"params file {path} does not exist")
    if not isinstance(raw, dict):
        raise ConfigError(f"{params} must hold a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    return _build(Config, raw, "")


def to_dict(cfg: Any) -> Any:
    """A plain dict (lists, not tuples) of a config, for YAML/JSON and MLflow."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field, for ``ditpipe params``."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.default_factory is not dataclasses.MISSING:  # a section
            rows += describe(f.default_factory, key)
        else:
            rows.append((key, to_dict(f.default), f.metadata.get("help", "")))
    return rows
