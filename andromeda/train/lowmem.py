"""Optimizers that keep less state than AdamW's two float32 moments per parameter.

Offers the two builders the trainer calls by name, `fn(model, param_groups, lr, betas,
weight_decay)`:
- `adamw8bit`: AdamW with block-wise 8-bit moments (Dettmers et al. 2022, "8-bit Optimizers
  via Block-wise Quantization"). Uses bitsandbytes' `AdamW8bit` (CPU support since 0.45)
  when it imports; otherwise `BlockwiseAdamW8bit` below.
- `galore`: GaLore (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank
  Projection") on the 2-D weights of the blocks: Adam moments live in a rank-r projection
  of the gradient, refreshed by SVD every `update_proj_gap` steps; embeddings, the head,
  norms and 3-D expert stacks use plain AdamW.
- `optimizer_state_bytes(opt)`: bytes held in optimizer state tensors.

Why GaLore is written here although the galore-torch package exists: that package keeps a
Python projector object in the optimizer state, which training checkpoints cannot restore
(they are read with `torch.load(weights_only=True)`); here the projection is a tensor.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from andromeda.errors import UserError


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _groups(model: nn.Module, param_groups) -> list[dict]:
    if param_groups is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in param_groups]
    for g in groups:
        g["params"] = list(g["params"])
        g.pop("names", None)
    return [g for g in groups if g["params"]]


# --- 8-bit AdamW -------------------------------------------------------------------------

def adamw8bit(model: nn.Module, param_groups, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
              eps: float = 1e-8) -> torch.optim.Optimizer:
    groups = _groups(model, param_groups)
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    except Exception:  # not installed, or no backend for this device
        return BlockwiseAdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


BLOCK = 256


def _to_blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


# Companding exponents: codes store (|x| / absmax) ** power, so resolution goes to small
# values, where most moments sit (a simple stand-in for the paper's dynamic tree map). The
# second moment spans a wider range and sits under a square root in the update, so it gets
# the stronger compression: an underflow to 0 there would blow the update up.
POWER = {True: 0.5, False: 0.25}


def _quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantisation with power-law companding.
    Returns (codes int8 for signed / uint8 for non-negative x, absmax per block)."""
    blocks = _to_blocks(x.float())
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    u = (blocks.abs() / absmax) ** POWER[signed]
    if signed:
        return (torch.sign(blocks) * (u * 127).round()).to(torch.int8), absmax.squeeze(1)
    return (u * 255).round().to(torch.uint8), absmax.squeeze(1)


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape, signed: bool) -> torch.Tensor:
    levels = 127.0 if signed else 255.0
    c = codes.float()
    magnitude = (c.abs() / levels) ** (1.0 / POWER[signed]) * absmax[:, None]
    blocks = torch.sign(c) * magnitude if signed else magnitude
    n = math.prod(shape)
    return blocks.reshape(-1)[:n].view(shape)


class BlockwiseAdamW8bit(torch.optim.Optimizer):
    """AdamW whose first moment is int8 and second moment uint8, each with one float32
    absmax per block of 256 values (about 2.03 bytes of state per parameter instead of 8).
    Tensors under `min_8bit_size` elements keep float32 moments, as in bitsandbytes."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, min_8bit_size: int = 4096):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                quantized = p.numel() >= self.min_8bit_size
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if quantized:
                        state["m_codes"], state["m_absmax"] = _quantize(torch.zeros_like(g), True)
                        state["v_codes"], state["v_absmax"] = _quantize(torch.zeros_like(g), False)
                    else:
                        state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                if quantized:
                    m = _dequantize(state["m_codes"], state["m_absmax"], g.shape, True)
                    v = _dequantize(state["v_codes"], state["v_absmax"], g.shape, False)
                else:
                    m, v = state["m"], state["v"]
                update = _adam_update(m, v, g, b1, b2, t, group["eps"])
                if quantized:
                    state["m_codes"], state["m_absmax"] = _quantize(m, True)
                    state["v_codes"], state["v_absmax"] = _quantize(v, False)
                _apply_update(p, update, group)
        return loss


def _adam_update(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b1: float, b2: float, t: float,
                 eps: float) -> torch.Tensor:
    """Advance Adam's moments m, v in place with gradient g; return the bias-corrected step."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)


def _apply_update(p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
    """Decoupled weight decay (AdamW), then the step."""
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(update.to(p.dtype), alpha=-group["lr"])


# --- GaLore ------------------------------------------------------------------------------

class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; in groups with `galore=True`, 2-D gradients are projected onto their top-`rank`
    singular vectors (the smaller side), Adam runs there, and the normalised update is
    projected back and multiplied by `scale` (GaLore, Algorithm 1)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25):
        if rank < 1 or update_proj_gap < 1:
            raise UserError("galore needs rank >= 1 and update_proj_gap >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, galore=False,
                                      rank=rank, update_proj_gap=update_proj_gap, scale=scale))

    @staticmethod
    def _projection(g: torch.Tensor, rank: int) -> torch.Tensor:
        U, _, Vh = torch.linalg.svd(g.float(), full_matrices=False)
        return U[:, :rank].contiguous() if g.shape[0] <= g.shape[1] else Vh[:rank].contiguous()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                low_rank = group["galore"] and p.dim() == 2
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                left = g.shape[0] <= g.shape[1] if low_rank else False
                if low_rank:
                    if int(state["step"]) % group["update_proj_gap"] == 0:
                        state["proj"] = self._projection(g, min(group["rank"], *g.shape))
                    P = state["proj"]
                    g = P.T @ g if left else g @ P.T  # (r, n) or (m, r)
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                update = _adam_update(state["exp_avg"], state["exp_avg_sq"], g, b1, b2, t, group["eps"])
                if low_rank:
                    update = (P @ update if left else update @ P) * group["scale"]
                _apply_update(p, update, group)
        return loss


def galore(model: nn.Module, param_groups, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
           rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, eps: float = 1e-8) -> GaLoreAdamW:
    """GaLore on the 2-D weights inside the blocks; everything else keeps full AdamW state."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    if head is not None and getattr(head, "weight", None) is not None:
        excluded.add(id(head.weight))
    groups = []
    for g in _groups(model, param_groups):
        low = [p for p in g["params"] if p.dim() == 2 and id(p) not in excluded]
        rest = [p for p in g["params"] if not (p.dim() == 2 and id(p) not in excluded)]
        for params, flag in ((low, True), (rest, False)):
            if params:
                groups.append(dict(g, params=params, galore=flag))
    return GaLoreAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                       update_proj_gap=update_proj_gap, scale=scale)
