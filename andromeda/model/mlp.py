"""Feed-forward layers: gated (SwiGLU, GeGLU; Shazeer 2020) and plain (GELU, ReLU).

`build_ffn(cfg, layer_idx)` picks the feed-forward for a layer from the `FFNS` table, so a
mixture-of-experts FFN can be chosen per layer by config without touching the block.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.config import ModelConfig
from andromeda.model.layout import ffn_for_layer
from andromeda.model.linear import make_linear

_ACT = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up share one matmul (w_in holds [gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mlp
        self.hidden = m.resolved_hidden(cfg.dim)
        self.act = _ACT[m.kind]
        self.w_in = make_linear(cfg, "mlp", cfg.dim, 2 * self.hidden, m.bias)
        self.w_out = make_linear(cfg, "mlp", self.hidden, cfg.dim, m.bias)
        self.w_out.is_residual_out = True
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, x: torch.Tensor, ctx=None, state=None) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.dropout(self.w_out(self.act(gate) * up))


class PlainMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mlp
        self.hidden = m.resolved_hidden(cfg.dim)
        self.act = _ACT[m.kind]
        self.w_in = make_linear(cfg, "mlp", cfg.dim, self.hidden, m.bias)
        self.w_out = make_linear(cfg, "mlp", self.hidden, cfg.dim, m.bias)
        self.w_out.is_residual_out = True
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, x: torch.Tensor, ctx=None, state=None) -> torch.Tensor:
        return self.dropout(self.w_out(self.act(self.w_in(x))))


def _dense_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return GatedMLP(cfg) if cfg.mlp.gated else PlainMLP(cfg)


def _moe_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    from andromeda.model.moe import MoE  # imported here: moe.py builds on this module

    return MoE(cfg, layer_idx)


# name -> constructor(cfg, layer_idx); option families that add FFNs (e.g. MoE) add a row
# here and a rule in `ffn_kind`.
FFNS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"dense": _dense_ffn, "moe": _moe_ffn}


def ffn_kind(cfg: ModelConfig, layer_idx: int) -> str:
    """Which FFN layer `layer_idx` uses (rules in andromeda.model.layout)."""
    return ffn_for_layer(cfg, layer_idx)


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return FFNS[ffn_kind(cfg, layer_idx)](cfg, layer_idx)
