"""Mixture-of-Experts feed-forward (Shazeer et al. 2017; GShard, Lepikhin et al. 2020;
Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

Offers:
- `TopKRouter`: softmax gates over experts, top-k per token, the load-balancing loss
  E * sum_e f_e * P_e (Switch eq. 4) and the router z-loss mean(logsumexp(logits)^2)
  (ST-MoE, Zoph et al. 2022), both returned already weighted in an `Aux` with the per-expert
  load. Shared with Mixture of Attention Heads (`moa.py`).
- `dispatch` / `grouped_matmul` / `combine`: tokens sorted by expert, one matmul per expert
  over a contiguous slice (or one `torch._grouped_mm` on CUDA), results scattered back with
  `index_add`; there is no Python loop over tokens.
- `MoE`: the FFN (options in the config's `moe` section; gated or plain experts as
  `mlp.kind`), optional always-on shared expert (DeepSeekMoE, Dai et al. 2024), no token
  dropping unless `capacity_factor` is set, BitNet ternary experts when `linear.mlp` is
  'bitnet'. Active parameters and FLOPs count the k experts a token reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from andromeda.model.bitlinear import TernaryWeights, quantize_activation, quantize_weight
from andromeda.model.config import ModelConfig
from andromeda.model.layer import FFN, InitRule
from andromeda.model.linear import linear_kind, make_linear
from andromeda.model.mlp import ACTIVATIONS, dense_ffn
from andromeda.model.state import Aux


class TopKRouter(nn.Module):
    def __init__(self, cfg: ModelConfig, dim: int, num_experts: int, top_k: int, normalize: bool,
                 balance_weight: float, z_weight: float, family: str, layer_idx: int):
        super().__init__()
        self.proj = make_linear(cfg, "router", dim, num_experts)
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.family, self.stats_key = family, f"{family}_load/layer{layer_idx}"

    def forward(self, x: torch.Tensor, report: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[Aux]]:
        """x (N, D) -> gates (N, k) in x.dtype, expert ids (N, k), and (when `report`) the
        per-expert load and, in training, the weighted balance and z-losses."""
        logits = self.proj(x).float()  # (N, E); routing in float32 for stable softmax
        probs = logits.softmax(dim=-1)
        gates, ids = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        aux = None
        if report:
            load = torch.bincount(ids.reshape(-1), minlength=self.num_experts).float() / ids.numel()
            aux = Aux(stats={self.stats_key: load.detach()})  # (E,) share of assignments per expert
            if self.training:
                balance = self.num_experts * (load * probs.mean(dim=0)).sum()
                z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
                # Named per family; the model sums them over layers.
                aux.losses[self.family + "_balance"] = self.balance_weight * balance
                aux.losses[self.family + "_z"] = self.z_weight * z_loss
        return gates.to(x.dtype), ids, aux


@dataclass
class Dispatch:
    order: torch.Tensor  # (M,) index into the flattened (N * k) assignments, grouped by expert
    token: torch.Tensor  # (M,) source token of each sorted assignment
    counts: torch.Tensor  # (E,) assignments per expert


def dispatch(ids: torch.Tensor, num_experts: int, capacity: Optional[int] = None) -> Dispatch:
    """Sort the (N, k) assignments by expert (stable, so earlier tokens come first)."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    return Dispatch(order, order // ids.shape[1], counts)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.shape[-1] % 16 == 0 and w.shape[-1] % 16 == 0)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, i) sorted by expert, w (E, i, o), counts (E,) -> (M, o); rows of expert e use w[e]."""
    if _grouped_mm_ok(x, w):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, w.to(x.dtype), offs=offs)
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            pieces.append(x[start:start + n] @ w[e].to(x.dtype))
        start += n
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


def chosen_experts(module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """(N * k, i, o): the weight `name` (E, i, o) of each assignment's expert, ids (N, k) in
    (token, slot) order. A ternary stack is quantised after the gather when compiling (only
    the chosen experts are read; the scale is per expert, so the result is the same)."""
    flat = ids.reshape(-1)
    if module.bitnet and torch.compiler.is_compiling() and name in module._parameters:
        return quantize_weight(getattr(module, name)[flat])
    return module._weight(name)[flat]


def per_token_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (N * k, i) in (token, slot) order, w (N * k, i, o) each row's expert matrix ->
    (N * k, o). Gathering each row's expert instead of sorting by expert reads exactly the
    chosen experts for the few tokens of a decoding step, and no shape depends on the
    routing, so the step compiles into one graph."""
    return torch.bmm(x.unsqueeze(1), w.to(x.dtype)).squeeze(1)


def combine(y: torch.Tensor, gates: torch.Tensor, d: Dispatch, n_tokens: int) -> torch.Tensor:
    """Weight each sorted result by its gate and sum the k results of every token."""
    y = y * gates.reshape(-1)[d.order, None]
    return y.new_zeros(n_tokens, y.shape[-1]).index_add(0, d.token, y)


class MoE(FFN, TernaryWeights):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = cfg.moe
        self.hidden = m.hidden_dim or cfg.mlp.resolved_hidden(cfg.dim)
        self.gated = cfg.mlp.gated
        self.act = ACTIVATIONS[cfg.mlp.kind]
        E = m.num_experts
        self.router = TopKRouter(cfg, cfg.dim, E, m.top_k, m.normalize_top_k, m.balance_loss_weight,
                                 m.z_loss_weight, "moe", layer_idx)
        in_width = 2 * self.hidden if self.gated else self.hidden
        self.w_in = nn.Parameter(torch.empty(E, cfg.dim, in_width))  # (E, D, [gate; up])
        self.w_out = nn.Parameter(torch.empty(E, self.hidden, cfg.dim))  # (E, H, D)
        self.bitnet = linear_kind(cfg, "mlp") == "bitnet"
        self.ternary_params = ("w_in", "w_out") if self.bitnet else ()
        self.expert_numel = cfg.dim * in_width + self.hidden * cfg.dim
        self.shared = None
        if m.shared_expert:
            self.shared = dense_ffn(cfg, layer_idx, hidden=m.shared_hidden_dim or self.hidden)

    @torch.no_grad()
    def init_weights(self, rule: InitRule) -> None:
        rule.linear(self.router.proj, "gate")
        rule.stacked(self.w_in, "ffn")
        rule.stacked(self.w_out, "out")
        if self.shared is not None:
            self.shared.init_weights(rule)

    def active_parameters(self) -> int:
        return super().active_parameters() - (self.mcfg.num_experts - self.mcfg.top_k) * self.expert_numel

    def _weight(self, name: str) -> torch.Tensor:
        return self.ternary_weight(name) if self.bitnet else getattr(self, name)

    def _capacity(self, n_tokens: int) -> Optional[int]:
        f = self.mcfg.capacity_factor
        return None if f is None else max(1, math.ceil(f * n_tokens * self.mcfg.top_k / self.mcfg.num_experts))

    def forward(self, x: torch.Tensor, ctx=None, state=None):
        B, L, D = x.shape
        flat = x.reshape(B * L, D)
        gates, ids, aux = self.router(flat, ctx is None or ctx.report)  # (N, k)
        if L == 1 and self.mcfg.capacity_factor is None:  # decoding: one token per sequence
            y = self._per_token(flat, gates, ids)
        else:
            y = self._sorted(flat, gates, ids)
        if self.shared is not None:
            y = y + self.shared(flat)[0]
        return y.view(B, L, D), aux

    def _experts_act(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return quantize_activation(h) if self.bitnet else h

    def _per_token(self, flat: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        xs = flat.repeat_interleave(k, dim=0)  # (N * k, D): row n*k + j is token n for slot j
        if self.bitnet:
            xs = quantize_activation(xs)
        h = self._experts_act(per_token_matmul(xs, chosen_experts(self, "w_in", ids)))
        y = per_token_matmul(h, chosen_experts(self, "w_out", ids)).view(N, k, -1)
        return (y * gates[..., None]).sum(dim=1)

    def _sorted(self, flat: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        N = flat.shape[0]
        d = dispatch(ids, self.mcfg.num_experts, self._capacity(N))
        xs = flat.index_select(0, d.token)  # (M, D)
        if self.bitnet:
            xs = quantize_activation(xs)
        h = self._experts_act(grouped_matmul(xs, self._weight("w_in"), d.counts))
        return combine(grouped_matmul(h, self._weight("w_out"), d.counts), gates, d, N)
