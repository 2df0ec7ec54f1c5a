"""Mixture of Attention Heads (Zhang et al. 2022, "MoA"; JetMoE, Shen et al. 2024).

Offers `MixtureOfAttentionHeads`, the 'moa' mixer of the layer plan (options in the config's
`moa` section; the combinations it cannot serve are refused by the config).

Each expert owns a query projection and an output projection for `heads // top_k` heads;
keys and values are one shared projection (`wkv`, `attention.kv_heads` heads), so the KV
cache is the same size as for plain attention. A router picks top-k experts per token; the
token's k experts' query heads are stacked head-major ([head0: slot0..k-1, head1: ...]) so
that grouped-query attention maps every expert head to the right shared KV head, one
attention call covers all experts, and each expert's output projection is weighted by its
gate. Load balancing and z-losses are added as 'moa_balance' / 'moa_z'.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from andromeda.model.attention import ScoreOptions
from andromeda.model.bitlinear import TernaryWeights, quantize_activation
from andromeda.model.config import ModelConfig
from andromeda.model.layer import InitRule, Mixer
from andromeda.model.linear import linear_kind, make_linear
from andromeda.model.moe import TopKRouter, chosen_experts, combine, dispatch, grouped_matmul, per_token_matmul
from andromeda.model.state import Context, KVCache


class MixtureOfAttentionHeads(ScoreOptions, Mixer, TernaryWeights):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = cfg.moa
        a = cfg.attention
        self.expert_heads = a.heads // m.top_k
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
    def init_weights(self, rule: InitRule) -> None:
        rule.linear(self.router.proj, "gate")
        k, v = self.wkv.weight.split([self.kv_width, self.kv_width], dim=0)
        rule.matrix(k, "qk")
        rule.matrix(v, "value")
        if self.wkv.bias is not None:
            self.wkv.bias.zero_()
        rule.stacked(self.w_q, "qk")
        rule.stacked(self.w_o, "out")

    def active_parameters(self) -> int:
        return super().active_parameters() - (self.mcfg.num_experts - self.mcfg.top_k) * self.expert_numel

    def flops_per_token(self, seq_len: int) -> float:
        """The active parameters (router, shared k/v projection, the k chosen experts' q and
        output projections) and attention scores over the k * heads/k query heads a token gets."""
        return 2.0 * self.active_parameters() + self.score_flops_per_token(seq_len, self.k * self.expert_heads)

    def new_state(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, max_len, self.kv_heads, self.head_dim, dtype, device)

    def _weight(self, name: str) -> torch.Tensor:
        return self.ternary_weight(name) if self.bitnet else getattr(self, name)

    def forward(self, x: torch.Tensor, ctx: Context, cache: Optional[KVCache] = None):
        B, L, D = x.shape
        N, k, he, hd = B * L, self.k, self.expert_heads, self.head_dim
        flat = x.reshape(N, D)
        gates, ids, aux = self.router(flat, ctx.report)  # (N, k)
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
            return y.view(B, L, D), aux
        o_sorted = out.index_select(0, d.order)
        if self.bitnet:
            o_sorted = quantize_activation(o_sorted)
        y = combine(grouped_matmul(o_sorted, self._weight("w_o"), d.counts), gates, d, N)
        return y.view(B, L, D), aux
