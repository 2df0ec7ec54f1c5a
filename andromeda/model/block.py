"""The transformer block: a mixer and a feed-forward on two residual lines (or one, in parallel).

Offers `Block(cfg, spec)`, built from one `LayerSpec` of the layer plan, `TokenShift` and
`ResidualGain`.

Tensor names are the same whatever the options: `mixer.*` and `ffn.*` are the sublayers
themselves, `mixer_norm` / `ffn_norm` their norms (a parallel block has one norm, `mixer_norm`,
whose output both read), `mixer_gain` / `ffn_gain` the learned skip gains when
`block.residual_gain` is set, `route.*` the Mixture-of-Depths router when the plan routes the block.

The residual rule comes from `norm.placement` (g = the learned skip gain, 1 without one):
    pre:      g * x + f(shift(norm(x)))
    post:     norm(g * x + f(shift(x)))
    deepnorm: norm(alpha * g * x + f(shift(x)))   (Wang et al. 2022, alpha = (2N)^(1/4))
    parallel: x + mixer(h) + ffn(h), h = shift(norm(x))   (GPT-J, PaLM; pre-norm only)
Variants are fixed in `__init__`; forward branches only on data (a state, a routing module).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from andromeda.model.config import ModelConfig
from andromeda.model.layer import deepnorm_alpha
from andromeda.model.norm import build_norm
from andromeda.model.plan import FFNS, MIXERS, ROUTINGS, LayerSpec
from andromeda.model.state import Aux, Context, LayerState, ShiftState, merge_aux


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


class ResidualGain(nn.Module):
    """A learned per-channel gain on the skip path, initialised to 1 (x-transformers'
    `scale_residual`; its DeepNorm multiplies the skip by this vector and by alpha)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _part(state: Optional[LayerState], name: str):
    return None if state is None else state.get(name)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        i = spec.index
        self.parallel = cfg.block.parallel
        self.pre = cfg.norm.placement == "pre"
        self.alpha = deepnorm_alpha(cfg.depth) if cfg.norm.placement == "deepnorm" else 1.0
        # Registration order fixes parameter order (and so optimizer state order): kept as
        # checkpoints of format version 1 have it.
        if self.parallel:
            self.mixer_norm = build_norm(cfg.norm, cfg.dim)
        self.mixer = MIXERS[spec.mixer].load()(cfg, i)
        if not self.parallel:
            self.mixer_norm = build_norm(cfg.norm, cfg.dim)
        self.ffn = FFNS[spec.ffn].load()(cfg, i)
        self.ffn_norm = None if self.parallel else build_norm(cfg.norm, cfg.dim)
        gain = cfg.block.residual_gain  # never with parallel blocks (checked by the config)
        self.mixer_gain = ResidualGain(cfg.dim) if gain else None
        self.ffn_gain = ResidualGain(cfg.dim) if gain else None
        self.route = ROUTINGS[spec.routing].load()(cfg, i)
        n = cfg.block.shift_tokens
        self.shift = TokenShift(n, cfg.dim) if n else None
        self.dropout = nn.Dropout(cfg.block.residual_dropout)
        self.dim = cfg.dim

    def new_state(self, batch: int, max_len: int, dtype, device) -> LayerState:
        def shift():
            return ShiftState(batch, self.shift.n, self.dim, dtype, device) if self.shift is not None else None

        parts = dict(mixer=self.mixer.new_state(batch, max_len, dtype, device), shift_mixer=shift())
        if not self.parallel:
            parts["shift_ffn"] = shift()
        if self.route is not None:
            parts["route"] = self.route.new_state(batch, device)
        return LayerState(**parts)

    def _stream_parameters(self) -> int:
        """Parameters of the norms and skip gains: one multiply-add each per token."""
        parts = (self.mixer_norm, self.ffn_norm, self.mixer_gain, self.ffn_gain)
        return sum(p.numel() for m in parts if m is not None for p in m.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        if self.route is None:
            return self._body_flops(seq_len)
        return self.route.flops_per_token(seq_len, self._body_flops)

    def _body_flops(self, seq_len: int) -> float:
        return self.mixer.flops_per_token(seq_len) + self.ffn.flops_per_token(seq_len) + 2.0 * self._stream_parameters()

    def active_parameters(self) -> int:
        inside = self.mixer.active_parameters() + self.ffn.active_parameters()
        routing = sum(p.numel() for p in self.route.parameters()) if self.route is not None else 0
        return inside + self._stream_parameters() + routing

    def forward(self, x: torch.Tensor, ctx: Context, state: Optional[LayerState] = None):
        if self.route is None:
            return self.body(x, ctx, state)
        return self.route(x, ctx, self.body, state)

    def body(self, x: torch.Tensor, ctx: Context, state: Optional[LayerState]) -> tuple[torch.Tensor, Optional[Aux]]:
        if self.parallel:
            h = self._shift(self.mixer_norm(x), state, "shift_mixer")
            mixed, aux_m = self.mixer(h, ctx, _part(state, "mixer"))
            fed, aux_f = self.ffn(h, ctx)
            return x + self.dropout(mixed + fed), merge_aux(aux_m, aux_f)
        x, aux_m = self._line(x, ctx, self.mixer, self.mixer_norm, self.mixer_gain, _part(state, "mixer"),
                              state, "shift_mixer")
        x, aux_f = self._line(x, ctx, self.ffn, self.ffn_norm, self.ffn_gain, None, state, "shift_ffn")
        return x, merge_aux(aux_m, aux_f)

    def _shift(self, h, state, name):
        return self.shift(h, _part(state, name)) if self.shift is not None else h

    def _line(self, x, ctx, fn, norm, gain, fn_state, state, shift_name):
        skip = gain(x) if gain is not None else x
        if self.pre:
            y, aux = fn(self._shift(norm(x), state, shift_name), ctx, fn_state)
            return skip + self.dropout(y), aux
        y, aux = fn(self._shift(x, state, shift_name), ctx, fn_state)
        return norm(self.alpha * skip + self.dropout(y)), aux
