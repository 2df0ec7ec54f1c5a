"""Dense feed-forward layers: gated (SwiGLU, GeGLU; Shazeer 2020) and plain (GELU, SiLU, ReLU).

Offers `GatedMLP`, `PlainMLP` and `dense_ffn(cfg, layer_idx)`, the 'dense' entry of the FFN
table in andromeda.model.plan (the kind of `mlp.kind` decides which of the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.config import ModelConfig
from andromeda.model.layer import FFN, InitRule
from andromeda.model.linear import make_linear

ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class GatedMLP(FFN):
    """down(act(gate(x)) * up(x)); gate and up share one matmul (w_in holds [gate; up])."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        m = cfg.mlp
        self.hidden = hidden or m.resolved_hidden(cfg.dim)
        self.act = ACTIVATIONS[m.kind]
        self.w_in = make_linear(cfg, "mlp", cfg.dim, 2 * self.hidden, m.bias)
        self.w_out = make_linear(cfg, "mlp", self.hidden, cfg.dim, m.bias)
        self.dropout = nn.Dropout(m.dropout)

    def init_weights(self, rule: InitRule) -> None:
        rule.linear(self.w_in, "ffn")
        rule.linear(self.w_out, "out")

    def forward(self, x: torch.Tensor, ctx=None, state=None):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.dropout(self.w_out(self.act(gate) * up)), None


class PlainMLP(FFN):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        m = cfg.mlp
        self.hidden = hidden or m.resolved_hidden(cfg.dim)
        self.act = ACTIVATIONS[m.kind]
        self.w_in = make_linear(cfg, "mlp", cfg.dim, self.hidden, m.bias)
        self.w_out = make_linear(cfg, "mlp", self.hidden, cfg.dim, m.bias)
        self.dropout = nn.Dropout(m.dropout)

    def init_weights(self, rule: InitRule) -> None:
        rule.linear(self.w_in, "ffn")
        rule.linear(self.w_out, "out")

    def forward(self, x: torch.Tensor, ctx=None, state=None):
        return self.dropout(self.w_out(self.act(self.w_in(x)))), None


def dense_ffn(cfg: ModelConfig, layer_idx: int = 0, hidden: int | None = None) -> FFN:
    return GatedMLP(cfg, hidden) if cfg.mlp.gated else PlainMLP(cfg, hidden)
