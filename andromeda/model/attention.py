"""Causal self-attention: multi-head, grouped-query and multi-query, with optional QK-norm,
rotary/xPos on q and k (and on v for imported x-transformers models), ALiBi on a subset of
heads, sliding windows and document masks.

Offers `ScoreOptions` (what every attention mixer shares: QK-norm, scale, rotary/xPos, ALiBi,
the KV cache write and the kernel call; also used by moa.py) and `Attention`, the mixer.
The layer owns only projections and norms; positions arrive in the forward context and the
KV cache arrives as an argument, so the same module serves training, prefill and decoding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from andromeda.model.backends import AttnSpec, attend
from andromeda.model.config import ModelConfig
from andromeda.model.layer import DerivedBuffers, InitRule, Mixer
from andromeda.model.linear import make_linear
from andromeda.model.norm import build_norm
from andromeda.model.position import alibi_slopes, apply_rotary, scale_rotary_part
from andromeda.model.state import Context, KVCache


class ScoreOptions(DerivedBuffers):
    """What every attention mixer (dense heads here, routed heads in moa.py) shares between
    its projections: QK-norm, the softmax scale, rotary/xPos, ALiBi, windows, the KV cache
    write and the kernel call. Subclasses call `_init_score_options` and `_attend_heads`."""

    def _init_score_options(self, cfg: ModelConfig) -> None:
        a = cfg.attention
        self.q_norm = self.k_norm = None
        if a.qk_norm != "none":
            # Per-head normalisation of q and k (Henry et al. 2020; Dehghani et al. 2023);
            # the learned per-dim gain is the spec's attn_qk_norm_dim_scale.
            self.q_norm = build_norm(cfg.norm, self.head_dim, a.qk_norm, affine=a.qk_norm_dim_scale)
            self.k_norm = build_norm(cfg.norm, self.head_dim, a.qk_norm, affine=a.qk_norm_dim_scale)
        self.scale = a.qk_norm_scale if (a.qk_norm != "none" and a.qk_norm_scale) else 1 / math.sqrt(self.head_dim)
        self.dropout, self.window, self.backend = a.dropout, a.window, a.backend
        self.n_alibi, self.score_heads = cfg.alibi_heads, a.heads
        self.register_buffer("alibi", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """ALiBi slopes for the first n_alibi heads, zero for the rest (they keep rotary only)."""
        if self.n_alibi:
            slopes = torch.zeros(self.score_heads)
            slopes[: self.n_alibi] = alibi_slopes(self.n_alibi)
            self.alibi = slopes.to(next(self.parameters()).device)

    def _attend_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                      cache: Optional[KVCache]) -> torch.Tensor:
        """q (B, H, L, hd), k and v (B, KVH, L, hd) fresh from the projections -> (B, H, L, hd)."""
        L = q.shape[2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rt = ctx.rotary
        if rt is not None:
            q = apply_rotary(q, rt.cos, rt.sin, rt.xpos_q)
            k = apply_rotary(k, rt.cos, rt.sin, rt.xpos_k)
            if rt.rotate_values:  # x-transformers 1.16 rotates values like keys
                v = apply_rotary(v, rt.cos, rt.sin, rt.xpos_k)
        pos = ctx.positions
        if cache is None:
            # The keys are the queries' own tokens: masks and ALiBi depend only on distances
            # within the call, the same in every row, so the first row's positions serve all.
            q_pos, k_pos, aligned, all_visible = pos.ids[:1], pos.ids[0], True, False
        else:
            k, v, k_pos = cache.update(pos, k, v)
            q_pos = pos.ids
            aligned = pos.offset == 0  # keys are exactly this call's tokens, from position 0
            all_visible = L == 1 and pos.offset is not None  # one token after the written prefix
        spec = AttnSpec(q_pos=q_pos, k_pos=k_pos, scale=self.scale, alibi=self.alibi,
                        alibi_heads=self.n_alibi, window=self.window, doc_ids=pos.doc_ids,
                        plain_causal=aligned, all_visible=all_visible,
                        dropout=self.dropout if self.training else 0.0, backend=self.backend)
        out = attend(q, k, v, spec)
        if rt is not None and rt.value_gain is not None:  # the values' xPos centre (Rotary.forward)
            out = scale_rotary_part(out, rt.value_gain)
        return out

    def score_flops_per_token(self, seq_len: int, heads: int) -> float:
        """Forward FLOPs of q.k^T and p.v per token: 2 * 2 * heads * head_dim * span. Like PaLM
        and nanoGPT, the full span is counted, not the causal half, so MFU figures compare."""
        span = min(seq_len, self.window) if self.window else seq_len
        return 4.0 * heads * self.head_dim * span


class Attention(ScoreOptions, Mixer):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        a = cfg.attention
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, cfg.head_dim
        self.q_width = self.heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        # One matmul for q, k and v: rows [q; k; v].
        self.wqkv = make_linear(cfg, "attention", cfg.dim, self.q_width + 2 * self.kv_width, a.bias)
        self.wo = make_linear(cfg, "attention", self.q_width, cfg.dim, a.bias)
        self._init_score_options(cfg)

    def new_state(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, max_len, self.kv_heads, self.head_dim, dtype, device)

    @torch.no_grad()
    def init_weights(self, rule: InitRule) -> None:
        q, k, v = self.wqkv.weight.split([self.q_width, self.kv_width, self.kv_width], dim=0)
        for part, role in ((q, "qk"), (k, "qk"), (v, "value")):
            rule.matrix(part, role)
        rule.linear(self.wo, "out")
        if self.wqkv.bias is not None:
            self.wqkv.bias.zero_()
        self.reset_buffers()

    def flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.active_parameters() + self.score_flops_per_token(seq_len, self.heads)

    def forward(self, x: torch.Tensor, ctx: Context, cache: Optional[KVCache] = None):
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q = q.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, L, hd)
        v = v.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        out = self._attend_heads(q, k, v, ctx, cache)  # (B, H, L, hd)
        return self.wo(out.transpose(1, 2).reshape(B, L, self.q_width)), None
