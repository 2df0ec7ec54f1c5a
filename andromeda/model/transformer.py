"""The decoder: embed -> blocks -> norm -> head.

`Transformer(cfg)` builds every architecture of the spec from a `ModelConfig`.
`forward(tokens, cache=None, start_pos=0, ...)` is the only entry point: training passes no
cache; inference makes one with `new_cache(batch, max_len)` and passes it with the absolute
position of the first token (an int, or a 0-d tensor for compiled decoding, or a (B,)
tensor giving each sequence its own position, for batched decoding of prompts of different
lengths).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn

from andromeda.infer.cache import ModelCache
from andromeda.model.block import build_block
from andromeda.model.config import ModelConfig
from andromeda.model.init import init_weights
from andromeda.model.linear import make_linear
from andromeda.model.norm import build_norm
from andromeda.model.position import Rotary, RotaryTables


@dataclasses.dataclass
class Context:
    """What every layer needs to know about the current forward call."""

    positions: torch.Tensor  # (L,) absolute positions of the input tokens, or (B, L) per sequence
    start_pos: Union[int, torch.Tensor]
    rotary: Optional[RotaryTables]
    plain_causal: bool  # positions are arange(L) and keys are exactly these tokens
    doc_ids: Optional[torch.Tensor] = None  # (B, L) document index, for packed training
    aux_losses: dict = dataclasses.field(default_factory=dict)  # name -> scalar, summed over layers
    stats: dict = dataclasses.field(default_factory=dict)  # name -> tensor, for metrics

    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        self.aux_losses[name] = self.aux_losses.get(name, 0.0) + value


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position.kind == "learned" else None
        self.rotary = Rotary(cfg) if cfg.position.rotary else None
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        self.layers = nn.ModuleList(build_block(cfg, i) for i in range(cfg.depth))
        # Post-norm and DeepNorm blocks end in a norm already.
        self.norm = build_norm(cfg.norm, cfg.dim) if cfg.norm.placement == "pre" else nn.Identity()
        self.head = make_linear(cfg, "head", cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.checkpointing = cfg.block.checkpoint_activations
        if not any(p.is_meta for p in self.parameters()):
            init_weights(self, cfg)
        self.last_context: Optional[Context] = None

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> ModelCache:
        """Preallocate inference state for `batch` sequences of up to `max_len` tokens."""
        max_len = max_len or self.cfg.max_seq_len
        p = next(self.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        return ModelCache([layer.init_state(batch, max_len, dtype, device) for layer in self.layers],
                          max_len=max_len, batch=batch)

    def forward(self, tokens: torch.Tensor, cache: Optional[ModelCache] = None,
                start_pos: Union[int, torch.Tensor] = 0, doc_ids: Optional[torch.Tensor] = None,
                last_only: bool = False, return_hidden: bool = False) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, V), or (B, 1, V) with last_only, or the final
        hidden states (B, L, D) with return_hidden. `self.last_context` keeps the auxiliary
        losses and statistics of this call (MoE balance loss, router loads)."""
        B, L = tokens.shape
        if cache is not None and doc_ids is not None:
            raise ValueError("document masks are for packed training; they do not combine with a cache")
        steps = torch.arange(L, device=tokens.device)
        per_sequence = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1
        positions = start_pos[:, None] + steps if per_sequence else start_pos + steps  # (L,) or (B, L)
        x = self.embed(tokens)  # (B, L, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.embed_dropout(x)
        rotary = self.rotary(positions, x.dtype) if self.rotary is not None else None
        plain = isinstance(start_pos, int) and start_pos == 0
        ctx = Context(positions, start_pos, rotary, plain, doc_ids)
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = _checkpointed(layer, x, ctx, state)
            else:
                x = layer(x, ctx, state)
        self.last_context = ctx
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.head(x)


def _checkpointed(layer: nn.Module, x: torch.Tensor, ctx: Context, state) -> torch.Tensor:
    """Run `layer` under activation checkpointing. The backward pass runs the layer a second
    time; if it reported to `ctx` directly, that recomputation would add every auxiliary loss
    and statistic again (after the loss was already taken) and keep the recomputed graph
    alive through `last_context`. So the layer reports to a private context whose contents
    are returned as outputs of the checkpointed call, and only the first run's are merged."""
    def run(x):
        local = dataclasses.replace(ctx, aux_losses={}, stats={})
        return layer(x, local, state), local.aux_losses, local.stats

    y, aux_losses, stats = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    for name, value in aux_losses.items():
        ctx.add_aux_loss(name, value)
    ctx.stats.update(stats)
    return y


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token). Modules that route tokens to a subset of their weights
    (experts) report the unused part through `inactive_parameters()`."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return total, total - inactive


def build_model(cfg: ModelConfig, device=None, dtype=None) -> Transformer:
    """Construct on `device` (use 'meta' to size a model without allocating it)."""
    with torch.device(device or "cpu"):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
