"""Causal self-attention: multi-head, grouped-query and multi-query, with optional QK-norm,
rotary/xPos on q and k, ALiBi on a subset of heads, sliding windows and document masks.

The layer owns only projections and norms; positions arrive in the forward context and the
KV cache arrives as an argument, so the same module serves training, prefill and decoding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from andromeda.infer.cache import KVCache
from andromeda.model.backends import AttnSpec, attend
from andromeda.model.config import ModelConfig
from andromeda.model.linear import make_linear
from andromeda.model.norm import build_norm
from andromeda.model.position import alibi_slopes, apply_rotary


class ScoreOptions:
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
        self.n_alibi = cfg.alibi_heads
        self.register_buffer("alibi", None, persistent=False)

    def _attend_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx,
                      cache: Optional[KVCache]) -> torch.Tensor:
        """q (B, H, L, hd), k and v (B, KVH, L, hd) fresh from the projections -> (B, H, L, hd)."""
        L = q.shape[2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rotary is not None:
            rt = ctx.rotary
            q = apply_rotary(q, rt.cos, rt.sin, rt.xpos_q)
            k = apply_rotary(k, rt.cos, rt.sin, rt.xpos_k)
        k_pos = ctx.positions
        plain, all_visible = ctx.plain_causal, False
        if cache is not None:
            k, v, k_pos = cache.update(ctx.start_pos, k, v)
            plain = plain and k.shape[2] == L
            # One new token after an int-positioned prefix: every returned key is visible.
            all_visible = L == 1 and isinstance(ctx.start_pos, int)
        spec = AttnSpec(q_pos=ctx.positions, k_pos=k_pos, scale=self.scale, alibi=self.alibi,
                        alibi_heads=self.n_alibi,
                        window=self.window, doc_ids=ctx.doc_ids, plain_causal=plain, all_visible=all_visible,
                        dropout=self.dropout if self.training else 0.0, backend=self.backend)
        return attend(q, k, v, spec)


class Attention(ScoreOptions, nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        a = cfg.attention
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, cfg.head_dim
        self.q_width = self.heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        # One matmul for q, k and v: rows [q; k; v].
        self.wqkv = make_linear(cfg, "attention", cfg.dim, self.q_width + 2 * self.kv_width, a.bias)
        self.wo = make_linear(cfg, "attention", self.q_width, cfg.dim, a.bias)
        self.wo.is_residual_out = True
        self._init_score_options(cfg)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """ALiBi slopes for the first n_alibi heads, zero for the rest (they keep rotary only)."""
        if self.n_alibi:
            slopes = torch.zeros(self.heads)
            slopes[: self.n_alibi] = alibi_slopes(self.n_alibi)
            device = self.wo.weight.device
            self.alibi = slopes.to(device)

    def init_state(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, max_len, self.kv_heads, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, ctx, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q = q.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, L, hd)
        v = v.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        out = self._attend_heads(q, k, v, ctx, cache)  # (B, H, L, hd)
        return self.wo(out.transpose(1, 2).reshape(B, L, self.q_width))
