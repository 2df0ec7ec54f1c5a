"""Normalisation layers, built by name: RMSNorm (Zhang & Sennrich 2019), LayerNorm, and L2Norm
(unit Euclidean norm, for cosine-similarity QK-norm as x-transformers computes it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.config import NormConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fused kernel where PyTorch has one; it normalises in float32 for half inputs.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class L2Norm(nn.Module):
    """x / max(||x||, 1e-12) times an optional per-dim gain (x-transformers' l2norm + qk_norm_dim_scale)."""

    def __init__(self, dim: int, affine: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2.0, dim=-1)
        return x * self.weight if self.weight is not None else x


def build_norm(cfg: NormConfig, dim: int, kind: str | None = None, affine: bool = True) -> nn.Module:
    kind = kind or cfg.kind
    if kind == "rms":
        return RMSNorm(dim, cfg.eps, affine)
    if kind == "layer":
        return LayerNorm(dim, cfg.eps, affine, cfg.bias)
    if kind == "l2":
        return L2Norm(dim, affine)
    raise ValueError(f"unknown norm kind {kind!r}")
