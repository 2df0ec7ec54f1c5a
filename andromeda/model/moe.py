"""Mixture-of-Experts feed-forward (Shazeer et al. 2017; GShard, Lepikhin et al. 2020;
Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

Offers:
- `MoEConfig`: `extras['moe']`, validated (top-k vs experts, loss weights, capacity).
- `TopKRouter`: softmax gates over experts, top-k per token, the load-balancing loss
  E * sum_e f_e * P_e (Switch eq. 4) and the router z-loss mean(logsumexp(logits)^2)
  (ST-MoE, Zoph et al. 2022), both added to `ctx.add_aux_loss` already weighted; per-expert
  load in `ctx.stats`. Shared with Mixture of Attention Heads (`moa.py`).
- `dispatch` / `grouped_matmul` / `combine`: tokens sorted by expert, one matmul per expert
  over a contiguous slice (or one `torch._grouped_mm` on CUDA), results scattered back with
  `index_add`; there is no Python loop over tokens.
- `MoE`: the FFN (gated or plain experts as `cfg.mlp.kind`), optional always-on shared
  expert (DeepSeekMoE, Dai et al. 2024), no token dropping unless `capacity_factor` is set,
  BitNet ternary experts when `extras['linear']['mlp'] == 'bitnet'`, and
  `inactive_parameters()` so parameter counts report active parameters per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from andromeda.errors import check
from andromeda.model.bitlinear import TernaryWeights, quantize_activation, quantize_weight
from andromeda.model.config import ModelConfig
from andromeda.model.layout import parse_family
from andromeda.model.linear import linear_kind, make_linear
from andromeda.model.mlp import _ACT, GatedMLP, PlainMLP


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    hidden_dim: Optional[int] = None
    """Hidden width of each expert; None means the dense FFN width (cfg.mlp)."""
    shared_expert: bool = False
    """Add one always-active dense expert of width shared_hidden_dim (default: hidden_dim)."""
    shared_hidden_dim: Optional[int] = None
    normalize_top_k: bool = True
    """Renormalise the k selected gates to sum to 1 (Mixtral); False keeps raw softmax (Switch)."""
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    capacity_factor: Optional[float] = None
    """None: every token reaches its k experts. A number: each expert takes at most
    capacity_factor * tokens * k / experts assignments per call; the rest are dropped."""

    def __post_init__(self):
        check(isinstance(self.num_experts, int) and self.num_experts >= 1,
              f"extras.moe.num_experts must be >= 1, got {self.num_experts!r}")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
              f"extras.moe.top_k={self.top_k!r} must be between 1 and num_experts ({self.num_experts})")
        check(self.hidden_dim is None or self.hidden_dim >= 1, "extras.moe.hidden_dim must be >= 1")
        check(self.shared_hidden_dim is None or self.shared_hidden_dim >= 1,
              "extras.moe.shared_hidden_dim must be >= 1")
        check(self.balance_loss_weight >= 0 and self.z_loss_weight >= 0, "extras.moe loss weights must be >= 0")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"extras.moe.capacity_factor must be > 0 or null, got {self.capacity_factor}")


class TopKRouter(nn.Module):
    def __init__(self, cfg: ModelConfig, dim: int, num_experts: int, top_k: int, normalize: bool,
                 balance_weight: float, z_weight: float, family: str, layer_idx: int):
        super().__init__()
        self.proj = make_linear(cfg, "router", dim, num_experts)
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.family, self.stats_key = family, f"{family}_load/layer{layer_idx}"

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> gates (N, k) in x.dtype and expert ids (N, k)."""
        logits = self.proj(x).float()  # (N, E); routing in float32 for stable softmax
        probs = logits.softmax(dim=-1)
        gates, ids = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        if ctx is not None:
            load = torch.bincount(ids.reshape(-1), minlength=self.num_experts).float() / ids.numel()
            ctx.stats[self.stats_key] = load.detach()  # (E,) share of assignments per expert
            if self.training:
                balance = self.num_experts * (load * probs.mean(dim=0)).sum()
                z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
                # Named per family and summed over layers by the context.
                ctx.add_aux_loss(self.family + "_balance", self.balance_weight * balance)
                ctx.add_aux_loss(self.family + "_z", self.z_weight * z_loss)
        return gates.to(x.dtype), ids


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


class MoE(nn.Module, TernaryWeights):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = parse_family(MoEConfig, cfg, "moe")
        self.hidden = m.hidden_dim or cfg.mlp.resolved_hidden(cfg.dim)
        self.gated = cfg.mlp.gated
        self.act = _ACT[cfg.mlp.kind]
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
            width = m.shared_hidden_dim or self.hidden
            shared_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, hidden_dim=width))
            self.shared = GatedMLP(shared_cfg) if self.gated else PlainMLP(shared_cfg)
        self.depth = cfg.depth

    @torch.no_grad()
    def reset_parameters_for_init(self, cfg: ModelConfig) -> None:
        self.w_in.normal_(0.0, cfg.init_std)
        self.w_out.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.depth))  # writes the residual

    def inactive_parameters(self) -> int:
        return (self.mcfg.num_experts - self.mcfg.top_k) * self.expert_numel

    def _weight(self, name: str) -> torch.Tensor:
        return self.ternary_weight(name) if self.bitnet else getattr(self, name)

    def _capacity(self, n_tokens: int) -> Optional[int]:
        f = self.mcfg.capacity_factor
        return None if f is None else max(1, math.ceil(f * n_tokens * self.mcfg.top_k / self.mcfg.num_experts))

    def forward(self, x: torch.Tensor, ctx=None, state=None) -> torch.Tensor:
        B, L, D = x.shape
        flat = x.reshape(B * L, D)
        gates, ids = self.router(flat, ctx)  # (N, k)
        if L == 1 and self.mcfg.capacity_factor is None:  # decoding: one token per sequence
            y = self._per_token(flat, gates, ids)
        else:
            y = self._sorted(flat, gates, ids)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, L, D)

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
