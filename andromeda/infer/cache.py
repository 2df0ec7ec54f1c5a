"""Inference state, preallocated once and passed into `Transformer.forward`.

- `KVCache`: static keys/values for one attention layer, (B, kv_heads, max_len, head_dim):
  only the KV heads are stored, so multi-query and grouped-query attention save memory for
  real. Writes go to absolute positions; reads return the written prefix (int positions) or
  the whole buffer plus slot positions (tensor positions, for compiled decoding), in which
  case unwritten slots sit "in the future" and the causal rule masks them. A (B,) tensor of
  positions lets every sequence of a batch write at its own position.
- `ShiftState`: the last `n` inputs of a token-shift site, so token shift stays exact when
  decoding one token at a time.
- `ModelCache`: one state object per layer, made by each layer's `init_state` so mixers other
  than attention (e.g. Mamba) bring their own state type.
- `batch_rows(cache, start, stop)`: a view of some sequences of a batch cache (prefill one
  prompt into its row); `recurrent_buffers` / `reset_recurrent`: the states that are not
  addressed by position (token shift), to snapshot or clear.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

Pos = Union[int, torch.Tensor]


class KVCache(nn.Module):
    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, start_pos: Pos, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, KVH, L, hd) at positions start_pos.. and return (k_all, v_all, k_pos)."""
        length = k.shape[2]
        if isinstance(start_pos, int):
            end = start_pos + length
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
            self.k[:, :, start_pos:end] = k
            self.v[:, :, start_pos:end] = v
            k_pos = torch.arange(end, device=k.device)
            return self.k[:, :, :end], self.v[:, :, :end], k_pos
        steps = torch.arange(length, device=k.device)
        if start_pos.dim() == 1:
            # Per-sequence positions (B,): row b writes at start_pos[b]..; the slots another
            # row has not reached sit in its future and the causal rule masks them.
            index = start_pos[:, None] + steps  # (B, L)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, index] = k.transpose(1, 2)  # advanced indices first: (B, L, KVH, hd)
            self.v[rows, :, index] = v.transpose(1, 2)
        else:
            index = start_pos + steps
            self.k.index_copy_(2, index, k)
            self.v.index_copy_(2, index, v)
        return self.k, self.v, torch.arange(self.max_len, device=k.device)


class ShiftState(nn.Module):
    """The last `n` rows fed to a token-shift site, oldest first, (B, n, D)."""

    def __init__(self, batch: int, n: int, dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.register_buffer("past", torch.zeros(batch, n, dim, dtype=dtype, device=device), persistent=False)


class LayerState(nn.Module):
    """Named sub-states of one layer ('kv', 'shift_attn', 'shift_ffn', 'ssm', ...)."""

    def __init__(self, **parts: Any):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)

    def get(self, name: str):
        return getattr(self, name, None)


class ModelCache(nn.Module):
    def __init__(self, layers: list[nn.Module], max_len: int, batch: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.max_len = max_len
        self.batch = batch


# ---------------------------------------------------------------- helpers for the generation engine
def _row_view(module: nn.Module, rows: slice) -> nn.Module:
    """A shallow copy of `module` whose buffers (and its children's) are views of `rows` of
    the originals, so writes through the copy land in the original storage."""
    view = object.__new__(type(module))
    view.__dict__ = dict(module.__dict__)
    view._buffers = {k: (b[rows] if b is not None else None) for k, b in module._buffers.items()}
    view._modules = {k: (_row_view(m, rows) if m is not None else None) for k, m in module._modules.items()}
    return view


def batch_rows(cache: ModelCache, start: int, stop: int) -> ModelCache:
    """The cache of sequences start..stop-1 of a batch cache, sharing its storage: a prompt
    can be prefilled alone into its row of a batch that then decodes together."""
    view = _row_view(cache, slice(start, stop))
    view.batch = stop - start
    return view


def recurrent_buffers(cache: ModelCache) -> list[torch.Tensor]:
    """Buffers of every state other than KV caches (token-shift rows, ...). Unlike a KV cache,
    whose slots are addressed by position, these summarise the whole past: they must start at
    zero for a new sequence and be restored to undo tokens (speculative decoding)."""
    out = []
    for module in cache.modules():
        if not isinstance(module, KVCache):
            out.extend(b for b in module.buffers(recurse=False) if b is not None)
    return out


def reset_recurrent(cache: ModelCache) -> None:
    """Zero the recurrent states so the cache can serve new sequences (KV slots need no reset:
    reads never go past the positions written for the current sequence)."""
    for buf in recurrent_buffers(cache):
        buf.zero_()
