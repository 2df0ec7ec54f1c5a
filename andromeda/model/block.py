"""Transformer blocks and the residual rules they are made of.

A block is two residual lines (or one, for PaLM-style parallel blocks). Each line is a
`Residual`: it owns the norm, the optional token shift and the residual rule (pre-norm,
post-norm or DeepNorm), and wraps the sublayer (a mixer such as attention, or an FFN).
Variants are chosen here in `__init__`; forward branches only on whether a cache is present.

`build_mixer(cfg, i)` / `build_ffn(cfg, i)` pick the sublayers per layer from name tables,
so Mamba mixers or MoE FFNs slot in by config.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from andromeda.infer.cache import LayerState, ShiftState
from andromeda.model.attention import Attention
from andromeda.model.config import ModelConfig
from andromeda.model.layout import mixer_for_layer, mod_for_layer
from andromeda.model.mlp import build_ffn
from andromeda.model.norm import build_norm


def deepnorm_alpha(depth: int) -> float:
    """Residual scale of DeepNet (Wang et al. 2022) for a decoder-only stack of `depth` layers."""
    return (2 * depth) ** 0.25


def deepnorm_beta(depth: int) -> float:
    """Init gain of DeepNet for v, output and FFN projections of a decoder-only stack."""
    return (8 * depth) ** -0.25


class TokenShift(nn.Module):
    """Shift channel group i back by i positions (groups of dim // (n+1) channels; the rest
    unshifted), as in x-transformers' shift_tokens and RWKV's time shift. Causal: a token
    only receives channels from earlier tokens. With a state, the previous call's last rows
    stand in for the zero padding, so decoding one token at a time is exact."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.n = n
        self.group = dim // (n + 1)

    def forward(self, x: torch.Tensor, state: Optional[ShiftState] = None) -> torch.Tensor:
        B, L, D = x.shape
        past = state.past if state is not None else x.new_zeros(B, self.n, D)
        full = torch.cat([past.to(x.dtype), x], dim=1)  # (B, n + L, D)
        parts = [x[..., : self.group]]
        for i in range(1, self.n + 1):
            lo, hi = i * self.group, (i + 1) * self.group
            parts.append(full[:, self.n - i: self.n - i + L, lo:hi])
        parts.append(x[..., (self.n + 1) * self.group:])
        if state is not None:
            state.past.copy_(full[:, -self.n:])
        return torch.cat(parts, dim=-1)


class Residual(nn.Module):
    """One residual line around `fn`:
    pre: x + f(shift(norm(x)));  post: norm(x + f(shift(x)));  deepnorm: norm(alpha*x + f(shift(x)))."""

    def __init__(self, cfg: ModelConfig, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = build_norm(cfg.norm, cfg.dim)
        self.pre = cfg.norm.placement == "pre"
        self.alpha = deepnorm_alpha(cfg.depth) if cfg.norm.placement == "deepnorm" else 1.0
        n = cfg.block.shift_tokens
        self.shift = TokenShift(n, cfg.dim) if n else None
        self.dropout = nn.Dropout(cfg.block.residual_dropout)
        self.dim = cfg.dim

    def _inner(self, h, ctx, fn_state, shift_state):
        if self.shift is not None:
            h = self.shift(h, shift_state)
        return self.dropout(self.fn(h, ctx, fn_state))

    def forward(self, x, ctx, fn_state=None, shift_state=None):
        if self.pre:
            return x + self._inner(self.norm(x), ctx, fn_state, shift_state)
        return self.norm(self.alpha * x + self._inner(x, ctx, fn_state, shift_state))

    def init_shift_state(self, batch, dtype, device):
        return ShiftState(batch, self.shift.n, self.dim, dtype, device) if self.shift else None


def _part(state: Optional[LayerState], name: str):
    return None if state is None else state.get(name)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.mixer = Residual(cfg, build_mixer(cfg, layer_idx))
        self.ffn = Residual(cfg, build_ffn(cfg, layer_idx))

    def forward(self, x, ctx, state: Optional[LayerState] = None):
        x = self.mixer(x, ctx, _part(state, "mixer"), _part(state, "shift_mixer"))
        x = self.ffn(x, ctx, None, _part(state, "shift_ffn"))
        return x

    def init_state(self, batch, max_len, dtype, device) -> LayerState:
        return LayerState(mixer=self.mixer.fn.init_state(batch, max_len, dtype, device),
                          shift_mixer=self.mixer.init_shift_state(batch, dtype, device),
                          shift_ffn=self.ffn.init_shift_state(batch, dtype, device))


class ParallelBlock(nn.Module):
    """x + mixer(h) + ffn(h) with h = shift(norm(x)) (GPT-J / PaLM parallel formulation)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm = build_norm(cfg.norm, cfg.dim)
        n = cfg.block.shift_tokens
        self.shift = TokenShift(n, cfg.dim) if n else None
        self.mixer = build_mixer(cfg, layer_idx)
        self.ffn = build_ffn(cfg, layer_idx)
        self.dropout = nn.Dropout(cfg.block.residual_dropout)
        self.dim = cfg.dim

    def forward(self, x, ctx, state: Optional[LayerState] = None):
        h = self.norm(x)
        if self.shift is not None:
            h = self.shift(h, _part(state, "shift_mixer"))
        return x + self.dropout(self.mixer(h, ctx, _part(state, "mixer")) + self.ffn(h, ctx))

    def init_state(self, batch, max_len, dtype, device) -> LayerState:
        shift = ShiftState(batch, self.shift.n, self.dim, dtype, device) if self.shift else None
        return LayerState(mixer=self.mixer.init_state(batch, max_len, dtype, device), shift_mixer=shift)


def _mamba(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    from andromeda.model.mamba import Mamba

    return Mamba(cfg, layer_idx)


def _moa(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    from andromeda.model.moa import MixtureOfAttentionHeads

    return MixtureOfAttentionHeads(cfg, layer_idx)


# name -> constructor(cfg, layer_idx); option families that add mixers (e.g. Mamba) add a
# row here and a rule in `mixer_kind`.
MIXERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"attention": Attention, "mamba": _mamba, "moa": _moa}


def mixer_kind(cfg: ModelConfig, layer_idx: int) -> str:
    """Which mixer layer `layer_idx` uses (rules in andromeda.model.layout)."""
    return mixer_for_layer(cfg, layer_idx)


def build_mixer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return MIXERS[mixer_kind(cfg, layer_idx)](cfg, layer_idx)


def build_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    block = ParallelBlock(cfg, layer_idx) if cfg.block.parallel else Block(cfg, layer_idx)
    if mod_for_layer(cfg, layer_idx):
        from andromeda.model.mod import MoDBlock  # Mixture-of-Depths routes around the whole block

        block = MoDBlock(cfg, block, layer_idx)
    return block
