"""The decoder: embed -> blocks -> norm -> head.

Offers `Transformer(cfg)` (every architecture of the spec, from a `ModelConfig`), `ModelOutput`,
`build_model(cfg, device, dtype)` and `count_parameters(model)`.

`forward(tokens, cache=None, start_pos=0, doc_ids=None, last_only=False, with_aux=False)` is the
only entry point. It returns the logits, or with `with_aux=True` a `ModelOutput`: the logits with
the auxiliary losses and statistics of this call (what training needs); nothing is kept on the
module. Training passes no cache; inference makes one with
`new_cache(batch, max_len)` and passes it with the absolute position of the first token: an
int, a 0-d tensor, or a (B,) tensor giving each sequence its own position (batched decoding of
prompts of different lengths). The model turns that into one `Positions` for every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn

from andromeda.model.block import Block
from andromeda.model.config import ModelConfig
from andromeda.model.layer import InitRule, reset_derived_buffers
from andromeda.model.linear import make_linear
from andromeda.model.norm import build_norm
from andromeda.model.position import Rotary
from andromeda.model.state import Aux, Context, ModelCache, Positions


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, L, V), or (B, 1, V) with last_only
    aux_losses: dict  # name -> weighted scalar, summed over layers (MoE balance, MoD predictor, ...)
    stats: dict  # name -> detached tensor (router loads, routed fractions), for metrics

    def aux_loss(self) -> Union[torch.Tensor, float]:
        """The sum of the auxiliary losses (0.0 when there are none)."""
        return sum(self.aux_losses.values()) if self.aux_losses else 0.0


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position.kind == "learned" else None
        self.rotary = Rotary(cfg) if cfg.position.rotary else None
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in cfg.plan)
        # Post-norm and DeepNorm blocks end in a norm already.
        self.norm = build_norm(cfg.norm, cfg.dim) if cfg.norm.placement == "pre" else nn.Identity()
        self.head = make_linear(cfg, "head", cfg.dim, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.checkpointing = cfg.block.checkpoint_activations
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every initialisation rule of the model: embeddings and head normal(init_std), norm
        gains one (biases zero), and each block's sublayers by the stack's `InitRule`."""
        rule = InitRule.for_config(self.cfg)
        std = self.cfg.init_std
        self.embed.weight.normal_(0.0, std)
        if self.pos_embed is not None:
            self.pos_embed.weight.normal_(0.0, std)
        if not self.cfg.tie_embeddings:
            rule.linear(self.head, "gate")  # the head reads the stream; no residual or DeepNet gain
        for m in self.modules():  # norms everywhere (block norms, QK-norms, Mamba's gated norm)
            if m is not self.embed and m is not self.pos_embed and isinstance(getattr(m, "weight", None),
                                                                               torch.Tensor) and m.weight.dim() == 1:
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for block in self.layers:
            block.mixer.init_weights(rule)
            block.ffn.init_weights(rule)
            if block.route is not None:
                block.route.init_weights(rule)
        self.reset_derived_buffers()

    def reset_derived_buffers(self) -> None:
        """Recompute tables derived from the config (rotary frequencies, ALiBi slopes), e.g.
        after loading onto a model built on the meta device or a change of dtype."""
        reset_derived_buffers(self)

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> ModelCache:
        """Preallocate inference state for `batch` sequences of up to `max_len` tokens."""
        max_len = max_len or self.cfg.max_seq_len
        p = next(self.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        return ModelCache([layer.new_state(batch, max_len, dtype, device) for layer in self.layers],
                          max_len=max_len, batch=batch)

    def forward(self, tokens: torch.Tensor, cache: Optional[ModelCache] = None,
                start_pos: Union[int, torch.Tensor] = 0, doc_ids: Optional[torch.Tensor] = None,
                last_only: bool = False, with_aux: bool = False) -> Union[torch.Tensor, ModelOutput]:
        """tokens (B, L) -> logits (B, L, V), or (B, 1, V) with last_only; with `with_aux`, a
        ModelOutput holding them with the auxiliary losses and statistics."""
        B, L = tokens.shape
        if cache is not None and doc_ids is not None:
            raise ValueError("document masks are for packed training; they do not combine with a cache")
        pos = Positions.make(start_pos, L, tokens.device, doc_ids)
        x = self.embed(tokens)  # (B, L, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos.ids)
        x = self.embed_dropout(x)
        rotary = self.rotary(pos.ids, x.dtype, cached=cache is not None) if self.rotary is not None else None
        ctx = Context(pos, rotary, report=cache is None)
        aux = Aux()
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, layer_aux = _checkpointed(layer, x, ctx, state)
            else:
                x, layer_aux = layer(x, ctx, state)
            aux.add(layer_aux)
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        return ModelOutput(logits, aux.losses, aux.stats) if with_aux else logits


def _checkpointed(layer: nn.Module, x: torch.Tensor, ctx: Context, state):
    """Run `layer` under activation checkpointing (recomputed in the backward pass). Its aux
    losses and statistics are outputs of the checkpointed call, so the recomputation adds
    nothing to them."""
    def run(x):
        y, aux = layer(x, ctx, state)
        return (y, aux.losses, aux.stats) if aux is not None else (y, {}, {})

    y, losses, stats = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    return y, Aux(losses, stats)


def count_parameters(model: Transformer) -> tuple[int, int]:
    """(total, active per token): the active count leaves out experts a token is not routed to
    (each layer reports its own through `active_parameters`)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    inactive = sum(sum(p.numel() for p in block.parameters()) - block.active_parameters() for block in model.layers)
    return total, total - inactive


def build_model(cfg: ModelConfig, device=None, dtype=None) -> Transformer:
    """Construct on `device` (use 'meta' to size a model without allocating it)."""
    with torch.device(device or "cpu"):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
