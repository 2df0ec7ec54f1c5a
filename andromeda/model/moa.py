"""Mixture of Attention Heads (Zhang et al. 2022, "MoA"; JetMoE, Shen et al. 2024).

Offers `MoAConfig` (`extras['moa']`) and `MixtureOfAttentionHeads`, a mixer that stands in
for attention (selected per layer by `andromeda.model.layout`).

Each expert owns a query projection and an output projection for `heads // top_k` heads;
keys and values are one shared projection (`wkv`, `attention.kv_heads` heads), so the KV
cache is the same size as for plain attention. A router picks top-k experts per token; the
token's k experts' query heads are stacked head-major ([head0: slot0..k-1, head1: ...]) so
that grouped-query attention maps every expert head to the right shared KV head, one
attention call covers all experts, and each expert's output projection is weighted by its
gate. Load balancing and z-losses are added as 'moa_balance' / 'moa_z'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from andromeda.errors import check
from andromeda.infer.cache import KVCache
from andromeda.model.attention import ScoreOptions
from andromeda.model.bitlinear import TernaryWeights, quantize_activation
from andromeda.model.config import ModelConfig
from andromeda.model.layout import parse_family
from andromeda.model.linear import linear_kind, make_linear
from andromeda.model.moe import TopKRouter, chosen_experts, combine, dispatch, grouped_matmul, per_token_matmul


@dataclass
class MoAConfig:
    num_experts: int = 8
    top_k: int = 2
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self):
        check(isinstance(self.num_experts, int) and self.num_experts >= 1,
              f"extras.moa.num_experts must be >= 1, got {self.num_experts!r}")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
              f"extras.moa.top_k={self.top_k!r} must be between 1 and num_experts ({self.num_experts})")
        check(self.balance_loss_weight >= 0 and self.z_loss_weight >= 0, "extras.moa loss weights must be >= 0")


class MixtureOfAttentionHeads(ScoreOptions, nn.Module, TernaryWeights):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = parse_family(MoAConfig, cfg, "moa")
        a = cfg.attention
        check(a.heads % m.top_k == 0, f"extras.moa.top_k ({m.top_k}) must divide attention.heads ({a.heads})")
        self.expert_heads = a.heads // m.top_k
        check(self.expert_heads % a.kv_heads == 0,
              f"attention.heads / extras.moa.top_k ({self.expert_heads}) must be divisible by attention.kv_heads "
              f"({a.kv_heads})")
        check(cfg.alibi_heads == 0, "Mixture of Attention Heads does not support ALiBi; set position.alibi_heads=0")
        self.k, self.kv_heads, self.head_dim = m.top_k, a.kv_heads, cfg.head_dim
        self.q_width = self.expert_heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        E = m.num_experts
        self.router = TopKRouter(cfg, cfg.dim, E, m.top_k, True, m.balance_loss_weight, m.z_loss_weight,
                                 "moa", layer_idx)
        self.wkv = make_linear(cfg, "attention", cfg.dim, 2 * self.kv_width, a.bias)
        self.w_q = nn.Parameter(torch.empty(E, cfg.dim, self.q_width))  # (E, D, he*hd)
        self.w_o = nn.Parameter(torch.empty(E, self.q_width, cfg.dim))  # (E, he*hd, D)
        self.bitnet = linear_kind(cfg, "attention") == "bitnet"
        self.ternary_params = ("w_q", "w_o") if self.bitnet else ()
        self.expert_numel = 2 * cfg.dim * self.q_width
        self._init_score_options(cfg)  # ALiBi is refused above, so no slopes are set

    @torch.no_grad()
    def reset_parameters_for_init(self, cfg: ModelConfig) -> None:
        self.w_q.normal_(0.0, cfg.init_std)
        self.w_o.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.depth))  # writes the residual

    def inactive_parameters(self) -> int:
        return (self.mcfg.num_experts - self.mcfg.top_k) * self.expert_numel

    def init_state(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, max_len, self.kv_heads, self.head_dim, dtype, device)

    def _weight(self, name: str) -> torch.Tensor:
        return self.ternary_weight(name) if self.bitnet else getattr(self, name)

    def forward(self, x: torch.Tensor, ctx, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, L, D = x.shape
        N, k, he, hd = B * L, self.k, self.expert_heads, self.head_dim
        flat = x.reshape(N, D)
        gates, ids = self.router(flat, ctx)  # (N, k)
        per_token = L == 1  # decoding: gather each token's experts (no sort; compiles)
        if per_token:
            xs = flat.repeat_interleave(k, dim=0)  # (token, slot) order
            q = per_token_matmul(quantize_activation(xs) if self.bitnet else xs, chosen_experts(self, "w_q", ids))
        else:
            d = dispatch(ids, self.mcfg.num_experts)
            xs = flat.index_select(0, d.token)
            q_sorted = grouped_matmul(quantize_activation(xs) if self.bitnet else xs, self._weight("w_q"), d.counts)
            q = q_sorted.new_zeros(N * k, self.q_width).index_copy(0, d.order, q_sorted)  # back to (token, slot)
        q = q.view(B, L, k, he, hd).permute(0, 3, 2, 1, 4).reshape(B, he * k, L, hd)  # head-major heads
        kv = self.wkv(x).view(B, L, 2, self.kv_heads, hd)
        key, value = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, KVH, L, hd)
        out = self._attend_heads(q, key, value, ctx, cache)  # (B, he*k, L, hd)
        out = out.view(B, he, k, L, hd).permute(0, 3, 2, 1, 4).reshape(N * k, self.q_width)
        if per_token:
            o = quantize_activation(out) if self.bitnet else out
            y = (per_token_matmul(o, chosen_experts(self, "w_o", ids)).view(N, k, D) * gates[..., None]).sum(dim=1)
            return y.view(B, L, D)
        o_sorted = out.index_select(0, d.order)
        if self.bitnet:
            o_sorted = quantize_activation(o_sorted)
        y = combine(grouped_matmul(o_sorted, self._weight("w_o"), d.counts), gates, d, N)
        return y.view(B, L, D)
