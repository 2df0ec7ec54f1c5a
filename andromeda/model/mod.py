"""Mixture-of-Depths (Raposo et al. 2024): route only some tokens through a block.

Offers `MoDConfig` (`extras['mod']`), `MoDBlock` (a wrapper that `build_block` puts around
the blocks chosen by `andromeda.model.layout`) and `MoDState` (its inference state).

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

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.errors import check
from andromeda.infer.cache import recurrent_buffers
from andromeda.model.config import ModelConfig
from andromeda.model.layout import parse_family
from andromeda.model.linear import make_linear
from andromeda.model.position import Rotary


@dataclass
class MoDConfig:
    capacity: float = 0.125
    """Share of a sequence's tokens that a routed block processes in training (paper: 12.5%)."""
    predictor_hidden: int = 64
    """Hidden width of the causal predictor MLP used at inference; 0 makes it linear."""
    predictor_loss_weight: float = 1.0
    """Weight of its BCE loss; it trains only the predictor (its input is detached)."""

    def __post_init__(self):
        check(isinstance(self.capacity, (int, float)) and 0 < self.capacity <= 1,
              f"extras.mod.capacity must be in (0, 1], got {self.capacity!r}")
        check(isinstance(self.predictor_hidden, int) and self.predictor_hidden >= 0,
              "extras.mod.predictor_hidden must be an integer >= 0")
        check(self.predictor_loss_weight >= 0, "extras.mod.predictor_loss_weight must be >= 0")


class MoDState(nn.Module):
    def __init__(self, batch: int, block_state: nn.Module, device=None):
        super().__init__()
        self.register_buffer("count", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.block = block_state


def row_view(state: Optional[nn.Module], b: int) -> Optional[nn.Module]:
    """A shallow copy of a state tree whose buffers are views of batch row b, so the
    block's in-place cache writes land in the full batch's buffers."""
    if state is None:
        return None
    view = state.__class__.__new__(state.__class__)
    view.__dict__ = dict(state.__dict__)
    view.__dict__["_buffers"] = {k: None if v is None else v[b:b + 1] for k, v in state._buffers.items()}
    view.__dict__["_modules"] = {k: row_view(m, b) for k, m in state._modules.items()}
    return view


class MoDBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module, layer_idx: int = 0):
        super().__init__()
        m = self.mcfg = parse_family(MoDConfig, cfg, "mod")
        check(cfg.norm.placement == "pre",
              "Mixture-of-Depths needs norm.placement='pre' (it scales the block's residual update)")
        self.block = block
        self.router = make_linear(cfg, "router", cfg.dim, 1)
        if m.predictor_hidden:
            self.predictor = nn.Sequential(nn.Linear(cfg.dim, m.predictor_hidden), nn.SiLU(),
                                           nn.Linear(m.predictor_hidden, 1))
        else:
            self.predictor = nn.Linear(cfg.dim, 1)
        self.rotary = Rotary(cfg) if cfg.position.rotary else None
        self.layer_idx = layer_idx

    def init_state(self, batch: int, max_len: int, dtype, device) -> MoDState:
        return MoDState(batch, self.block.init_state(batch, max_len, dtype, device), device)

    def _sub_context(self, ctx, start: int, n: int, device, dtype, doc_ids):
        positions = start + torch.arange(n, device=device)
        rotary = self.rotary(positions, dtype) if self.rotary is not None else None
        # dataclasses.replace keeps the aux_losses/stats dicts, so inner layers report to ctx.
        return dataclasses.replace(ctx, positions=positions, start_pos=start, rotary=rotary,
                                   plain_causal=start == 0, doc_ids=doc_ids)

    def forward(self, x: torch.Tensor, ctx, state: Optional[MoDState] = None) -> torch.Tensor:
        logits = self.router(x).squeeze(-1).float()  # (B, L)
        weight = torch.sigmoid(logits).to(x.dtype)  # scales the block update: trains the router
        if self.training and state is None:
            return self._train_forward(x, ctx, logits, weight)
        return self._causal_forward(x, ctx, state, weight)

    def _train_forward(self, x, ctx, logits, weight):
        B, L, D = x.shape
        C = min(L, max(1, math.ceil(self.mcfg.capacity * L)))
        idx = logits.topk(C, dim=-1).indices.sort(dim=-1).values  # (B, C) in time order
        chosen = torch.zeros(B, L, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        pred = self.predictor(x.detach()).squeeze(-1).float()
        bce = F.binary_cross_entropy_with_logits(pred, chosen.float())
        ctx.add_aux_loss("mod_predictor", self.mcfg.predictor_loss_weight * bce)
        ctx.stats[f"mod_predictor_acc/layer{self.layer_idx}"] = ((pred > 0) == chosen).float().mean().detach()
        gather = idx[..., None].expand(B, C, D)
        sub = x.gather(1, gather)  # (B, C, D)
        doc = ctx.doc_ids.gather(1, idx) if ctx.doc_ids is not None else None
        y = self.block(sub, self._sub_context(ctx, 0, C, x.device, x.dtype, doc))
        delta = (y - sub) * weight.gather(1, idx)[..., None]
        return x + torch.zeros_like(x).scatter(1, gather, delta)

    def _causal_forward(self, x, ctx, state, weight):
        B = x.shape[0]
        chosen = self.predictor(x).squeeze(-1) > 0  # (B, L): each token decides alone
        ctx.stats[f"mod_fraction/layer{self.layer_idx}"] = chosen.float().mean().detach()
        if state is None:
            return self._uncached_forward(x, ctx, chosen, weight)
        if x.shape[1] == 1:
            return self._decode_forward(x, ctx, state, chosen, weight)
        out = x.clone()
        for b in range(B):  # sequences route different numbers of tokens
            sel = chosen[b].nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            start = int(state.count[b]) if state is not None else 0
            doc = ctx.doc_ids[b:b + 1, sel] if ctx.doc_ids is not None else None
            sub = x[b:b + 1, sel]
            sub_ctx = self._sub_context(ctx, start, sel.numel(), x.device, x.dtype, doc)
            y = self.block(sub, sub_ctx, row_view(state.block, b) if state is not None else None)
            out[b, sel] = (sub + (y - sub) * weight[b, sel][None, :, None])[0]
        if state is not None:
            state.count += chosen.sum(dim=1)
        return out

    def _uncached_forward(self, x, ctx, chosen, weight):
        """Eval forward without a cache, all rows in one block call. Each row's routed tokens
        are packed to the front in time order and the row is padded on the right with its
        unrouted tokens (as many as the longest row needs). The block is causal, so padding
        after a row's last routed token cannot change that row's routed outputs; the padded
        updates are then dropped."""
        B, L, D = x.shape
        counts = chosen.sum(dim=1)  # (B,)
        C = int(counts.max())
        if C == 0:
            return x
        steps = torch.arange(L, device=x.device)
        order = torch.where(chosen, steps, steps + L).argsort(dim=1)[:, :C]  # (B, C): routed first
        valid = (torch.arange(C, device=x.device) < counts[:, None]).to(x.dtype)
        gather = order[..., None].expand(B, C, D)
        sub = x.gather(1, gather)
        doc = ctx.doc_ids.gather(1, order) if ctx.doc_ids is not None else None
        y = self.block(sub, self._sub_context(ctx, 0, C, x.device, x.dtype, doc))
        delta = (y - sub) * (weight.gather(1, order) * valid)[..., None]
        return x.scatter_add(1, gather, delta)

    def _decode_forward(self, x, ctx, state, chosen, weight):
        """One token per sequence (decoding), with no shape that depends on the routing, so
        the step compiles into one graph. Every row runs the block at its own routed position
        (`state.count`); a row whose token skips the block keeps its residual stream and gets
        its recurrent block states (token shift, Mamba) back. Its attention write lands in
        the slot its next routed token will overwrite, which no query reads before then."""
        pos = state.count.clone()  # (B,) where each row's next routed token goes
        positions = pos[:, None]
        rotary = self.rotary(positions, x.dtype) if self.rotary is not None else None
        sub_ctx = dataclasses.replace(ctx, positions=positions, start_pos=pos, rotary=rotary,
                                      plain_causal=False, doc_ids=None)
        recurrent = recurrent_buffers(state.block)
        saved = [buf.clone() for buf in recurrent]
        y = self.block(x, sub_ctx, state.block)
        keep = chosen[:, 0]
        for buf, old in zip(recurrent, saved):
            buf.copy_(torch.where(keep.view(-1, *([1] * (buf.dim() - 1))), buf, old))
        state.count += keep
        return x + (y - x) * (weight * chosen.to(weight.dtype))[..., None]
