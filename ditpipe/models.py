"""Denoisers: DiT (adaLN-Zero), cross-attention DiT (PixArt-alpha), MM-DiT (SD3) and a U-Net baseline.

Read top to bottom like DiT's ``models.py``: embedders, block, final layer, model, then size presets
and the registry. Every architecture is wrapped in :class:`Denoiser`, which gives them one call:
``denoiser(x, t, emb, mask, pooled)`` with ``t`` on the 0..1000 scale.

Why our own DiT: diffusers' ``DiTTransformer2DModel`` copies the timestep/class embedder into every
block (about 750M parameters for XL/2 instead of the paper's 675M). PixArt's and SD3's transformers
and the U-Net are diffusers' own: they are faithful to their papers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditpipe.config import ModelConfig
from ditpipe.errors import ConfigError, DitpipeError
from ditpipe.io import verify_tree
from ditpipe.presets import Preset, parse_size

MODEL = ModelConfig()  # the params.yaml defaults of the dit options, so a bare build_model builds the default

# ---------------------------------------------------------------- embedders


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors: sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels to vectors; the extra last row is the "no label" embedding for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (N, D)


class PooledTextEmbedder(nn.Module):
    """The caption's pooled embedding to a conditioning vector (added to the timestep's)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)  # (N, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """2-D sine-cosine position embedding of a ``grid`` x ``grid`` patch grid: (grid*grid, dim)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gh), one_d(dim // 2, gw)], axis=1)


# ---------------------------------------------------------------- block and final layer


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused SDPA kernels."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


def key_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) bool caption mask -> (N, 1, 1, L) SDPA mask; a caption with no token at all opens every column (no NaN
    from all -inf rows): what it then reads is padding, so its users drop it (CrossAttention multiplies by has)."""
    return (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]


class CrossAttention(nn.Module):
    """Image tokens attend to the caption's token embeddings; padding is masked out."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        has = mask.any(dim=1)  # (N,): a caption with no token at all adds nothing
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)  # (N, H, T, D/H)
        k, v = self.kv(ctx).reshape(n, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)  # (N, H, L, D/H) each
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(mask))
        return self.proj(x.transpose(1, 2).reshape(n, t, d)) * has[:, None, None].to(x.dtype)


class CaptionBlock(nn.Module):
    """A pre-norm transformer block over the caption's tokens (padding masked out), no timestep: Lumina-Image 2.0's
    context refiner. Words re-read by layers trained with the denoiser can bind what a frozen encoder leaves apart
    (which colour the relation puts on which side), where a per-token projection sees one word at a time."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden_size))

    def forward(self, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx = ctx + self.attn(self.norm1(ctx), key_mask(mask))
        return ctx + self.mlp(self.norm2(ctx))  # (N, L, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning, and optionally cross-attention to caption tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False,
                 mlp_conv: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if cross_attention else None
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden_size))
        # a depthwise k x k convolution between the MLP's layers (residual): each token also sees its neighbours
        self.mlp_conv = nn.Conv2d(hidden, hidden, mlp_conv, padding=mlp_conv // 2, groups=hidden) if mlp_conv else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_conv is None:
            return self.mlp(x)
        h = self.mlp[0](x)  # (N, T, 4D)
        n, t, d = h.shape
        side = math.isqrt(t)
        h = h + self.mlp_conv(h.transpose(1, 2).reshape(n, d, side, side)).flatten(2).transpose(1, 2)
        return self.mlp[2](self.mlp[1](h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), ctx, mask)  # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * self.feed_forward(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


# ---------------------------------------------------------------- model


class DiT(ModelMixin, ConfigMixin):
    """Diffusion Transformer (Peebles & Xie 2023) with one shared conditioning embedder.

    Conditioning ``c`` = timestep embedding + pooled caption embedding (when ``text_dim``) + class
    embedding (when ``num_classes``), injected into every block through adaLN-Zero. With
    ``cross_attention`` every block also attends to the caption's token embeddings (as in the DiT
    paper's cross-attention variant): a pooled sentence vector mostly loses word order, which says
    which colour goes with which shape and which object is left of the other. ``mlp_conv`` (a kernel
    size, 0 = none) puts a depthwise convolution inside every block's MLP, as in PVTv2's and U-DiT's
    feed-forward: a locality prior that the paper's DiT lacks, which small models on small data learn faster with.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int = 0, text_dim: int = 0, cross_attention: bool = False, mlp_conv: int = 0,
                 caption_layers: int = 0):
        super().__init__()
        if cross_attention and not text_dim:
            raise ConfigError("DiT: cross_attention needs caption embeddings (text_dim > 0)")
        if mlp_conv < 0 or mlp_conv and mlp_conv % 2 == 0:
            raise ConfigError(f"DiT: mlp_conv must be 0 or an odd kernel size, got {mlp_conv}")
        if caption_layers and not cross_attention:
            raise ConfigError(f"DiT: caption_layers ({caption_layers}) refine caption tokens: needs cross_attention")
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None
        self.text_embedder = PooledTextEmbedder(text_dim, hidden_size) if text_dim else None
        # caption tokens to the model width, as PixArt's caption projection
        self.caption_embedder = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"),
                                              nn.Linear(hidden_size, hidden_size)) if cross_attention else None
        self.caption_blocks = nn.ModuleList([CaptionBlock(hidden_size, num_heads, mlp_ratio)
                                             for _ in range(caption_layers)])
        grid = sample_size // patch_size
        pos = torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float().unsqueeze(0)
        pos = pos.to(self.x_embedder.weight.device)  # meta when counting parameters without memory
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, as in DiT
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention, mlp_conv)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
        for block in self.caption_blocks:  # each refiner layer starts as the identity
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp[2].weight)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, pooled: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(timestep)  # (N, D)
        if self.text_embedder is not None:
            c = c + self.text_embedder(pooled)
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_labels)
        ctx = mask = None
        if self.caption_embedder is not None:
            mask = encoder_attention_mask.bool()
            ctx = self.caption_embedder(encoder_hidden_states.to(x.dtype))  # (N, L, D)
            for block in self.caption_blocks:
                ctx = block(ctx, mask)  # (N, L, D)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, ctx, mask, use_reentrant=False)
            else:
                x = block(x, c, ctx, mask)  # (N, T, D)
        return self.unpatchify(self.final_layer(x, c))  # (N, C_out, H, W)


# ---------------------------------------------------------------- one interface for every arch


@dataclass(frozen=True)
class Spec:
    """What a denoiser is built for: latent shape and caption embedding width."""

    latent_channels: int
    latent_size: int
    text_dim: int
    num_classes: int = 0
    learn_sigma: bool = False  # DiT's class-conditional setting predicts the variance too

    @property
    def out_channels(self) -> int:
        return self.latent_channels * (2 if self.learn_sigma else 1)


def _call_dit(m, x, t, emb, mask, pooled, y):
    if m.config.get("cross_attention"):
        return m(x, t, pooled=pooled, class_labels=y, encoder_hidden_states=emb, encoder_attention_mask=mask)
    return m(x, t, pooled=pooled, class_labels=y)


def _call_cross(m, x, t, emb, mask, pooled, y):
    return m(x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask,
             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def _call_mmdit(m, x, t, emb, mask, pooled, y):
    return m(x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample


def _call_unet(m, x, t, emb, mask, pooled, y):
    return m(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample


# arch -> (the diffusers model class, how to call it with (x, t, emb, mask, pooled, class_labels))
INNER: dict[str, tuple[type[ModelMixin], Callable]] = {
    "dit": (DiT, _call_dit),
    "cross": (PixArtTransformer2DModel, _call_cross),
    "mmdit": (SD3Transformer2DModel, _call_mmdit),
    "unet": (UNet2DConditionModel, _call_unet),
}


def trim_padding(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns after the longest caption of a batch: keys no token attends to.

    Call it on CPU tensors before they go to the device (finding the length is a host sync on a GPU);
    the models mask padding anyway, so this only saves work.
    """
    used = mask.bool().any(dim=0).nonzero()
    keep = int(used.max()) + 1 if len(used) else 1
    return emb[:, :keep], mask[:, :keep]


class Denoiser(nn.Module):
    """``inner`` (a diffusers model) behind one call: ``(x, t, emb, mask, pooled) -> prediction``."""

    def __init__(self, inner: ModelMixin, arch: str):
        super().__init__()
        self.inner, self.arch = inner, arch
        self._call = INNER[arch][1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                pooled: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(self.inner, x, t, emb, mask, pooled, class_labels)

    def enable_gradient_checkpointing(self) -> None:
        self.inner.enable_gradient_checkpointing()


def arch_of(inner: ModelMixin) -> str:
    """The arch name of a loaded diffusers model (for pipelines that hold the bare model)."""
    for arch, (cls, _) in INNER.items():
        if type(inner) is cls:
            return arch
    raise ValueError(f"{type(inner).__name__} is not a ditpipe denoiser (known: {', '.join(INNER)})")


def build_dit(preset: Preset, patch: int, spec: Spec, tokens: bool = MODEL.tokens,
              mlp_conv: int = MODEL.mlp_conv, caption_layers: int = MODEL.caption_layers) -> Denoiser:
    reads_tokens = tokens and spec.text_dim > 0  # a class-conditional DiT has no caption
    inner = DiT(sample_size=spec.latent_size, patch_size=patch, in_channels=spec.latent_channels,
                out_channels=spec.out_channels, hidden_size=preset.hidden_size, depth=preset.depth,
                num_heads=preset.num_heads, num_classes=spec.num_classes, text_dim=spec.text_dim,
                cross_attention=reads_tokens, mlp_conv=mlp_conv, caption_layers=caption_layers if reads_tokens else 0)
    return Denoiser(inner, "dit")


def build_cross(preset: Preset, patch: int, spec: Spec) -> Denoiser:
    inner = PixArtTransformer2DModel(
        num_attention_heads=preset.num_heads, attention_head_dim=preset.hidden_size // preset.num_heads,
        in_channels=spec.latent_channels, out_channels=spec.out_channels, num_layers=preset.depth,
        cross_attention_dim=preset.hidden_size, sample_size=spec.latent_size, patch_size=patch,
        caption_channels=spec.text_dim, use_additional_conditions=False, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    )
    return Denoiser(inner, "cross")


def build_mmdit(preset: Preset, patch: int, spec: Spec) -> Denoiser:
    inner = SD3Transformer2DModel(
        sample_size=spec.latent_size, patch_size=patch, in_channels=spec.latent_channels, num_layers=preset.depth,
        attention_head_dim=preset.hidden_size // preset.num_heads, num_attention_heads=preset.num_heads,
        joint_attention_dim=spec.text_dim, caption_projection_dim=preset.hidden_size,
        pooled_projection_dim=spec.text_dim, out_channels=spec.out_channels,
        pos_embed_max_size=max(spec.latent_size // patch, 1),
    )
    return Denoiser(inner, "mmdit")


def build_unet(preset: Preset, patch: int, spec: Spec) -> Denoiser:
    chans = preset.unet_channels
    n = len(chans)
    inner = UNet2DConditionModel(
        sample_size=spec.latent_size, in_channels=spec.latent_channels, out_channels=spec.out_channels,
        block_out_channels=chans, layers_per_block=2 if preset.depth > 2 else 1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec.text_dim, attention_head_dim=8,  # heads, despite the name
        norm_num_groups=min(32, math.gcd(*chans)),
    )
    return Denoiser(inner, "unet")


# (preset, patch, spec) -> Denoiser; dit also takes its own options (see build_model)
ARCHS: dict[str, Callable[..., Denoiser]] = {
    "dit": build_dit,
    "cross": build_cross,
    "mmdit": build_mmdit,
    "unet": build_unet,
}


def build_model(arch: str, size: str, spec: Spec, tokens: bool = MODEL.tokens,
                mlp_conv: int = MODEL.mlp_conv, caption_layers: int = MODEL.caption_layers) -> Denoiser:
    """The denoiser named by ``model.arch`` and ``model.size`` for latents/captions of ``spec``.

    ``tokens``, ``mlp_conv`` and ``caption_layers`` (``model.*``, with the same defaults) are ``dit``'s own
    options: cross-attention to the caption's tokens (the other archs always read them), a depthwise
    convolution in every block's MLP, and transformer layers over the caption's tokens (with ``tokens`` only).
    """
    if arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    preset, patch = parse_size(size)
    if arch != "unet" and spec.latent_size % patch:
        raise ConfigError(f"model.size {size}: patch {patch} does not divide the {spec.latent_size}px latent")
    if arch == "dit":
        return build_dit(preset, patch, spec, tokens, mlp_conv, caption_layers)
    return ARCHS[arch](preset, patch, spec)


def count_parameters(model: nn.Module) -> int:
    """All parameters, the fixed position embedding included, as DiT's paper counts them."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: Denoiser, spec: Spec, max_length: int = 8) -> float:
    """FLOPs of one forward pass on one sample (2 per multiply-accumulate), counted by PyTorch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, spec.latent_channels, spec.latent_size, spec.latent_size)
    emb = torch.zeros(1, max_length, max(spec.text_dim, 1))
    mask = torch.ones(1, max_length, dtype=torch.long)
    pooled = torch.zeros(1, max(spec.text_dim, 1))
    y = torch.zeros(1, dtype=torch.long) if spec.num_classes else None
    counter = FlopCounterMode(display=False)
    # The math SDPA backend runs attention as bmm ops the counter sees; CPU's fused kernel has no formula.
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        model(x, torch.ones(1) * 500, emb, mask, pooled, y)
    return float(counter.get_total_flops())


def preset_table(spec: Spec, archs: tuple[str, ...] = tuple(ARCHS), patches: tuple[int, ...] = (2,),
                 max_length: int = 77, tokens: bool = MODEL.tokens, mlp_conv: int = MODEL.mlp_conv) -> list[dict]:
    """Parameters and forward GFLOPs (multiply-accumulates, the DiT paper's unit) of every preset.

    Models are built on the meta device: shapes only, so even XL costs no memory or time.
    """
    from ditpipe.presets import PRESETS

    rows = []
    for arch in archs:
        for name in PRESETS:
            for patch in (patches if arch != "unet" else (2,)):
                if arch != "unet" and spec.latent_size % patch:
                    continue
                size = f"{name}/{patch}"
                with torch.device("meta"):
                    model = build_model(arch, size, spec, tokens, mlp_conv)
                    flops = forward_flops(model, spec, max_length)
                seq = (spec.latent_size // patch) ** 2 if arch != "unet" else None
                rows.append({"arch": arch, "size": size if arch != "unet" else name, "tokens": seq,
                             "params_m": count_parameters(model) / 1e6, "gflops": flops / 2e9})
    return rows


# ---------------------------------------------------------------- a trained run: final/ditpipe.json and its loader

RUN_INFO = "ditpipe.json"


@dataclass(frozen=True)
class RunInfo:
    """What ``train`` hands on beside the EMA weights in ``final/``: enough to sample, evaluate and export."""

    arch: str  # model.arch
    size: str  # model.size
    objective: str  # train.objective
    step: int  # optimizer steps trained
    spec: Spec  # latent shape and caption width the model was built for
    latents: dict  # the shards' latents section: vae_identity, scaling_factor, shift_factor, resolution, ...
    text: dict  # the shards' text section: encoder, encoder_identity, max_length, dim, dtype
    parameters: int
    shards: str  # the shards folder trained on
    shards_index_sha256: str
    config: dict = field(default_factory=dict)  # the resolved params of the run
    mlflow_run_id: str | None = None
    flops_per_image: float = 0.0  # training FLOPs per image (forward + backward)
    batch_size: int = 0  # global batch size (all processes)
    train_seconds: float = 0.0  # wall time of the training loop, in-run evaluations included, over all resumes

    def write(self, final_dir: str | Path) -> None:
        from ditpipe.io import write_json

        write_json(Path(final_dir) / RUN_INFO, {**asdict(self), "spec": asdict(self.spec)})

    @classmethod
    def read(cls, final_dir: str | Path) -> RunInfo:
        from ditpipe.errors import DitpipeError
        from ditpipe.io import read_json

        path = Path(final_dir) / RUN_INFO
        if not path.exists():
            raise DitpipeError(f"{path} not found: {final_dir} is not a finished ditpipe run (run `ditpipe train`)")
        raw = read_json(path)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known and k != "spec"}, spec=Spec(**raw["spec"]))


def final_dir(run_or_final: str | Path) -> Path:
    """``final/`` of a run folder, or the folder itself when it already is one."""
    path = Path(run_or_final)
    return path if (path / RUN_INFO).exists() or not (path / "final").exists() else path / "final"


def load_denoiser(run_or_final: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, RunInfo]:
    """Exactly the trained (EMA) ``Denoiser`` of a run, in eval mode, and its :class:`RunInfo`; every arch."""
    final = final_dir(run_or_final)
    if (final / "checksums.json").exists() and (problem := verify_tree(final)):
        raise DitpipeError(f"{final} is damaged: {problem}; re-run `ditpipe train` (it rewrites final/ from the "
                           "last checkpoint) or `dvc checkout train`")
    info = RunInfo.read(final)
    if info.arch not in INNER:
        raise ConfigError(f"{final}: unknown arch {info.arch!r} (known: {', '.join(INNER)})")
    inner = INNER[info.arch][0].from_pretrained(final)
    return Denoiser(inner, info.arch).to(device).eval(), info
