"""Optimizers for ``train.optimizer``: AdamW, or Muon on the weight matrices of the blocks (and of the caption
projections) with AdamW on the rest.

Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-Schulz") replaces each weight matrix's
momentum update by the nearest semi-orthogonal matrix, so every direction of the update moves at the same
rate instead of a few dominant ones. It is meant for the hidden matrices only: embeddings, the output layer,
biases, norms and convolutions keep AdamW. The update is ``torch.optim.Muon``'s (Nesterov momentum 0.95, the
quintic Newton-Schulz iteration, the learning rate scaled to AdamW's update size) written out here because
torch runs the iteration in bfloat16, which CPUs without bfloat16 matrix units run about 4x slower than the
whole training step. Matrices of one shape are orthogonalised as one batch, and on a CPU wide ones (4D x D and the
like) through their small Gram matrix: on the default DiT that halves the iteration's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's) quintic iteration
GRAM_FROM = 2  # wide by at least this ratio: iterate on the Gram matrix alone (fewer FLOPs, about the same result)


def _gram_form(x: torch.Tensor) -> bool:
    """The Gram form never recomputes A from X, so its rounding errors add up: about 1e-4 in float32, but 15-40%
    under TF32 (simulated), which CUDA training turns on; so only on a CPU, whose float32 matmuls that setting
    (torch's float32 matmul precision, which train.py lowers to "high") leaves exact."""
    return x.device.type == "cpu" and x.shape[2] >= GRAM_FROM * x.shape[1]


def _newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration X <- (a I + b A + c A^2) X, A = X X^T, on a batch (B, m, n), m <= n, of spectral norm
    <= 1. Every matrix the iteration makes is a polynomial in G = X0 X0^T, so for wide X it can run on m x m
    matrices alone: A' = P A P and Q' = P Q, then X = Q X0. Over five steps that is 17 m^3 + 2 m^2 n
    multiply-adds against 5 m^3 + 10 m^2 n: 0.64x on the default DiT's matrices."""
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs at least one step, got {steps}")
    a, b, c = NS_COEFFICIENTS
    if not _gram_form(x):
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x
    gram, q = x @ x.mT, None  # (B, m, m)
    for k in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        poly.diagonal(dim1=1, dim2=2).add_(a)  # + a I: P is a polynomial in A, so it commutes with A and Q
        q = poly if q is None else poly @ q
        if k < steps - 1:
            gram = poly @ gram @ poly  # the next step's X X^T
    return q @ x


def orthogonalize_all(gs: list[torch.Tensor], steps: int = 5, eps: float = 1e-7) -> list[torch.Tensor]:
    """About U V^T of each ``g = U S V^T`` (singular values pushed into about 0.7-1.2), in float32; matrices of
    one shape go through the iteration as one batch."""
    groups: dict[tuple, list[int]] = {}
    flat = []
    for i, g in enumerate(gs):
        x = g.float()
        flat.append(x.T if x.shape[0] > x.shape[1] else x)  # iterate on the smaller Gram matrix
        groups.setdefault(batch_key(g), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(gs)
    for idx in groups.values():
        x = torch.stack([flat[i] for i in idx])  # (B, m, n)
        x = _newton_schulz(x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps), steps)  # spectral norm <= 1
        for i, y in zip(idx, x.unbind(0), strict=True):
            out[i] = (y.T if gs[i].shape[0] > gs[i].shape[1] else y).to(gs[i].dtype)
    return out


def batch_key(g: torch.Tensor) -> tuple:
    """Matrices with the same key are orthogonalised as one batch: (smaller side, larger side, device)."""
    return min(g.shape), max(g.shape), g.device


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of one matrix ``g = U S V^T`` (``orthogonalize_all`` of one)."""
    return orthogonalize_all([g], steps, eps)[0]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups marked ``muon``, AdamW on the others; one optimizer, so one scheduler, one
    state dict and accelerate's wrapping work as for AdamW."""

    def __init__(self, matrices: list[nn.Parameter], others: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 ns_steps: int = 5):
        groups = [{"params": matrices, "muon": True}, {"params": others, "muon": False}]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay,
                                                            "momentum": momentum, "betas": betas, "eps": eps,
                                                            "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        assert closure is None, "MuonAdamW takes no closure"
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                p.mul_(1 - lr * wd)  # decoupled weight decay, as both torch optimizers do
            if group["muon"]:
                self._muon(params, group, lr)
            else:
                for p in params:
                    self._adamw(p, group, lr)

    def _muon(self, params: list[nn.Parameter], group: dict, lr: float) -> None:
        m, batches = group["momentum"], {}
        for p in params:
            batches.setdefault(batch_key(p), []).append(p)
        for same in batches.values():  # one batch at a time: only its updates are held at once
            nesterov = []
            for p in same:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["momentum_buffer"].lerp_(p.grad, 1 - m)
                nesterov.append(p.grad.lerp(state["momentum_buffer"], m))
            for p, update in zip(same, orthogonalize_all(nesterov, group["ns_steps"]), strict=True):
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))  # the RMS of an AdamW update at this lr

    def _adamw(self, p: nn.Parameter, group: dict, lr: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU, as torch's: .item() syncs nothing
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (b1, b2), step = group["betas"], state["step"].add_(1).item()
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2 ** step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** step))


# Linear layers that project a frozen text encoder's features into the model (ours; PixArt's; SD3's tokens and
# pooled vector): their inputs are dense vectors, not the one-hot rows of an embedding table, so Muon applies
CAPTION_PROJECTIONS = ("caption_embedder", "text_embedder", "caption_projection", "context_embedder")


def hidden_matrices(model: nn.Module, captions: bool = True) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters: the weights of the linear layers inside the model's blocks
    (``blocks``, ``caption_blocks``, diffusers' ``transformer_blocks``, ``down_blocks``, ``mid_block``...) and,
    with ``captions``, of the caption projections; and the rest, 2-D tables that are not a layer's weight
    (PixArt's ``scale_shift_table``) included."""
    keys = ("block", *CAPTION_PROJECTIONS) if captions else ("block",)
    linear = {id(m.weight) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and any(k in name for k in keys)}
    matrices, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (matrices if id(p) in linear else others).append(p)
    return matrices, others


def adamw(model: nn.Module, lr: float, weight_decay: float, captions: bool = True) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def muon(model: nn.Module, lr: float, weight_decay: float, captions: bool = True) -> torch.optim.Optimizer:
    return MuonAdamW(*hidden_matrices(model, captions), lr=lr, weight_decay=weight_decay)


# train.optimizer -> (model, peak lr, weight decay, train.muon_captions) -> optimizer
OPTIMIZERS: dict[str, Callable[[nn.Module, float, float, bool], torch.optim.Optimizer]] = {"adamw": adamw, "muon": muon}
