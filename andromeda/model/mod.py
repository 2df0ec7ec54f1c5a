"""Mixture-of-Depths (Raposo et al. 2024): route only some tokens through a block.

Offers `MixtureOfDepths`, the 'mod' routing of the layer plan (options in the config's `mod`
section): the block calls it with its own residual body, and it decides which tokens go through;
`RouteState` is its inference state, and `no_routing`, the 'none' entry of the table.

Training (model.train(), no cache), as in the paper: a linear router scores every token;
the top `capacity * L` tokens of each sequence go through the block, the rest pass by on
the residual stream unchanged. The block's update is multiplied by sigmoid(router score),
which puts the router on the gradient path. The chosen tokens form a shorter sequence that
the block processes as if it were contiguous (positions 0..C-1 for rotary and the cache).

Inference (eval mode, or any call with a cache): top-k over the sequence would let a token's
fate depend on later tokens, so it is not causal. Following the paper (section 3.5), a small
MLP predictor, trained alongside with binary cross-entropy on the router's top-k decisions
and fed a stop-gradient copy of the block input, decides per token instead: the token goes
through iff the predictor's logit is > 0. That rule reads only the token's own (causal)
hidden state, so eval forwards are causal and cached decoding equals the full forward. In
the cache, each sequence keeps its own count of routed tokens, which is where its next
routed token is written in the block's own state. The training-mode forward is not causal
(a later token can displace an earlier one from the top-k); only its loss sees this.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.config import ModelConfig
from andromeda.model.layer import InitRule
from andromeda.model.linear import make_linear
from andromeda.model.position import Rotary
from andromeda.model.state import Aux, Context, LayerState, Positions, merge_aux, recurrent_buffers, state_view

Body = Callable[[torch.Tensor, Context, Optional[LayerState]], tuple[torch.Tensor, Optional[Aux]]]
"""A block's residual computation: (x, ctx, state) -> (x after the block, aux)."""


def no_routing(cfg: ModelConfig, layer_idx: int = 0) -> None:
    """Every token goes through every block: no routing module at all."""
    return None


class RouteState(nn.Module):
    """Per sequence, how many tokens went through the block: where its next routed token goes."""

    def __init__(self, batch: int, device=None):
        super().__init__()
        self.register_buffer("count", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)


class MixtureOfDepths(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = cfg.mod
        self.router = make_linear(cfg, "router", cfg.dim, 1)
        if m.predictor_hidden:
            self.predictor = nn.Sequential(nn.Linear(cfg.dim, m.predictor_hidden), nn.SiLU(),
                                           nn.Linear(m.predictor_hidden, 1))
        else:
            self.predictor = nn.Linear(cfg.dim, 1)
        self.rotary = Rotary(cfg) if cfg.position.rotary else None
        self.layer_idx = layer_idx

    @torch.no_grad()
    def init_weights(self, rule: InitRule) -> None:
        rule.linear(self.router, "gate")
        for m in self.predictor.modules():
            if isinstance(m, nn.Linear):
                rule.linear(m, "gate")

    def routed_length(self, seq_len: int) -> int:
        """Tokens of a training sequence of `seq_len` that go through the block."""
        return min(seq_len, max(1, math.ceil(self.mcfg.capacity * seq_len)))

    def flops_per_token(self, seq_len: int, body_flops: Callable[[int], float]) -> float:
        """Router and predictor on every token; the block on the routed share of them, as a
        sequence of the routed length (its attention spans C tokens, not L)."""
        own = 2.0 * sum(p.numel() for p in self.parameters() if p.dim() >= 2)
        C = self.routed_length(seq_len)
        return own + C / seq_len * body_flops(C)

    def new_state(self, batch: int, device) -> RouteState:
        return RouteState(batch, device)

    def _context(self, ctx: Context, start, n: int, device, dtype, doc_ids) -> Context:
        pos = Positions.make(start, n, device, doc_ids)
        rotary = self.rotary(pos.ids, dtype) if self.rotary is not None else None
        return Context(pos, rotary, ctx.report)

    def forward(self, x: torch.Tensor, ctx: Context, body: Body, state: Optional[LayerState] = None):
        logits = self.router(x).squeeze(-1).float()  # (B, L)
        weight = torch.sigmoid(logits).to(x.dtype)  # scales the block update: trains the router
        if self.training and state is None:
            return self._train_forward(x, ctx, body, logits, weight)
        chosen = self.predictor(x).squeeze(-1) > 0  # (B, L): each token decides alone
        aux = Aux(stats={f"mod_fraction/layer{self.layer_idx}": chosen.float().mean().detach()}) if ctx.report \
            else None
        if state is None:
            y, inner = self._uncached_forward(x, ctx, body, chosen, weight)
        elif x.shape[1] == 1:
            y, inner = self._decode_forward(x, ctx, body, state, chosen, weight)
        else:
            y, inner = self._prefill_forward(x, ctx, body, state, chosen, weight)
        return y, merge_aux(aux, inner)

    def _train_forward(self, x, ctx, body, logits, weight):
        B, L, D = x.shape
        C = self.routed_length(L)
        idx = logits.topk(C, dim=-1).indices.sort(dim=-1).values  # (B, C) in time order
        chosen = torch.zeros(B, L, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        pred = self.predictor(x.detach()).squeeze(-1).float()
        bce = F.binary_cross_entropy_with_logits(pred, chosen.float())
        aux = Aux(losses={"mod_predictor": self.mcfg.predictor_loss_weight * bce},
                  stats={f"mod_predictor_acc/layer{self.layer_idx}": ((pred > 0) == chosen).float().mean().detach()})
        gather = idx[..., None].expand(B, C, D)
        sub = x.gather(1, gather)  # (B, C, D)
        doc = ctx.positions.doc_ids.gather(1, idx) if ctx.positions.doc_ids is not None else None
        y, inner = body(sub, self._context(ctx, 0, C, x.device, x.dtype, doc), None)
        delta = (y - sub) * weight.gather(1, idx)[..., None]
        return x + torch.zeros_like(x).scatter(1, gather, delta), aux.add(inner)

    def _prefill_forward(self, x, ctx, body, state, chosen, weight):
        """Cached prefill: sequences route different numbers of tokens, so one row at a time,
        each continuing at its own routed count."""
        out, aux = x.clone(), None
        doc_ids = ctx.positions.doc_ids
        for b in range(x.shape[0]):
            sel = chosen[b].nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            start = int(state.route.count[b])
            doc = doc_ids[b:b + 1, sel] if doc_ids is not None else None
            sub = x[b:b + 1, sel]
            y, inner = body(sub, self._context(ctx, start, sel.numel(), x.device, x.dtype, doc),
                            state_view(state, slice(b, b + 1)))
            out[b, sel] = (sub + (y - sub) * weight[b, sel][None, :, None])[0]
            aux = merge_aux(aux, inner)
        state.route.count += chosen.sum(dim=1)
        return out, aux

    def _uncached_forward(self, x, ctx, body, chosen, weight):
        """Eval forward without a cache, all rows in one block call. Each row's routed tokens
        are packed to the front in time order and the row is padded on the right with its
        unrouted tokens (as many as the longest row needs). The block is causal, so padding
        after a row's last routed token cannot change that row's routed outputs; the padded
        updates are then dropped."""
        B, L, D = x.shape
        counts = chosen.sum(dim=1)  # (B,)
        C = int(counts.max())
        if C == 0:
            return x, None
        steps = torch.arange(L, device=x.device)
        order = torch.where(chosen, steps, steps + L).argsort(dim=1)[:, :C]  # (B, C): routed first
        valid = (torch.arange(C, device=x.device) < counts[:, None]).to(x.dtype)
        gather = order[..., None].expand(B, C, D)
        sub = x.gather(1, gather)
        doc_ids = ctx.positions.doc_ids
        doc = doc_ids.gather(1, order) if doc_ids is not None else None
        y, inner = body(sub, self._context(ctx, 0, C, x.device, x.dtype, doc), None)
        delta = (y - sub) * (weight.gather(1, order) * valid)[..., None]
        return x.scatter_add(1, gather, delta), inner

    def _decode_forward(self, x, ctx, body, state, chosen, weight):
        """One token per sequence (decoding), with no shape that depends on the routing, so
        the step compiles into one graph. Every row runs the block at its own routed position
        (the route state's count); a row whose token skips the block keeps its residual stream
        and gets its recurrent block states (token shift, Mamba) back. Its attention write
        lands in the slot its next routed token will overwrite, which no query reads before then."""
        count = state.route.count
        recurrent = [buf for name, part in state.named_children() if name != "route"
                     for buf in recurrent_buffers(part)]
        saved = [buf.clone() for buf in recurrent]
        y, inner = body(x, self._context(ctx, count.clone(), 1, x.device, x.dtype, None), state)
        keep = chosen[:, 0]
        for buf, old in zip(recurrent, saved):
            buf.copy_(torch.where(keep.view(-1, *([1] * (buf.dim() - 1))), buf, old))
        count += keep
        return x + (y - x) * (weight * chosen.to(weight.dtype))[..., None], inner
