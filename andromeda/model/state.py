"""What a forward call carries besides the activations: positions, context, inference state, aux.

Offers:
- `Positions`: the absolute positions of the tokens of one call, the one representation every
  layer reads. `ids` (B or 1, L) always; `offset` is the shared first position when it is known
  on the host (an int, also while compiling), None when rows start at their own positions
  (batched decoding) or the start is a tensor (CUDA-graph decoding); `doc_ids` marks packed
  documents. `Positions.make(start, batch, length, device)` accepts what callers pass as
  `start_pos`: an int, a 0-d tensor, or a (B,) tensor.
- `Context`: positions plus the rotary tables computed once per call, and `report` (whether
  layers should gather statistics: uncached calls only, so decoding steps do no bookkeeping).
- `Aux`: auxiliary losses and statistics that a layer returns with its output.
- Inference state: `KVCache` (keys/values of the KV heads only, written at absolute positions),
  `ShiftState` (the last inputs of a token-shift site), `LayerState` (a layer's named parts),
  `ModelCache` (one LayerState per layer); each layer makes its own (`new_state`).
- `state_view(state, rows, span=None)`: a view of some batch rows of a state tree sharing its
  storage, with `span` also cut to cache positions 0..span-1 (batched decoding reads no further
  than the furthest row needs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch
from torch import nn

StartPos = Union[int, torch.Tensor]


@dataclasses.dataclass
class Positions:
    ids: torch.Tensor  # (B or 1, L) absolute position of every input token
    offset: Optional[int]  # shared first position, known on the host; None: per-row (or traced) starts
    doc_ids: Optional[torch.Tensor] = None  # (B, L) document index per token (packed training)

    @classmethod
    def make(cls, start: StartPos, length: int, device, doc_ids: Optional[torch.Tensor] = None) -> "Positions":
        steps = torch.arange(length, device=device)
        if isinstance(start, torch.Tensor):
            start = start.reshape(-1).to(device)  # a 0-d tensor is one shared start
            return cls(start[:, None] + steps, None, doc_ids)
        return cls((start + steps)[None], start, doc_ids)

    @property
    def length(self) -> int:
        return self.ids.shape[-1]


@dataclasses.dataclass
class Context:
    positions: Positions
    rotary: Any = None  # andromeda.model.position.RotaryTables for these positions, or None
    report: bool = True  # gather statistics (uncached calls); decoding steps skip them


@dataclasses.dataclass
class Aux:
    """Auxiliary losses (name -> scalar, weighted, summed over layers) and statistics
    (name -> detached tensor) returned by a layer or a whole forward call."""

    losses: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)

    def add(self, other: Optional["Aux"]) -> "Aux":
        if other is not None:
            for name, value in other.losses.items():
                self.losses[name] = self.losses[name] + value if name in self.losses else value
            self.stats.update(other.stats)
        return self


def merge_aux(*parts: Optional[Aux]) -> Optional[Aux]:
    present = [p for p in parts if p is not None and (p.losses or p.stats)]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    out = Aux()
    for p in present:
        out.add(p)
    return out


# ---------------------------------------------------------------- inference state
class KVCache(nn.Module):
    """Static keys/values (B, kv_heads, max_len, head_dim) of one attention layer."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, pos: Positions, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, KVH, L, hd) at `pos` and return (k_all, v_all, k_pos (Lk,)).

        With a host-known offset, reads stop at the written prefix. Otherwise the whole buffer
        comes back with its slot positions: slots a row has not reached sit in its future, and
        the causal rule masks them (what lets rows at different positions decode together)."""
        length = k.shape[2]
        if pos.offset is not None:
            end = pos.offset + length
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
            self.k[:, :, pos.offset:end] = k
            self.v[:, :, pos.offset:end] = v
            return self.k[:, :, :end], self.v[:, :, :end], torch.arange(end, device=k.device)
        if pos.ids.shape[0] == 1:
            self.k.index_copy_(2, pos.ids[0], k)
            self.v.index_copy_(2, pos.ids[0], v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, pos.ids] = k.transpose(1, 2)  # advanced indices first: (B, L, KVH, hd)
            self.v[rows, :, pos.ids] = v.transpose(1, 2)
        # The buffer's own length (not max_len): a compiled step then keeps one graph for
        # every span view of the cache (state_view), the length being a symbolic size.
        return self.k, self.v, torch.arange(self.k.shape[2], device=k.device)


class ShiftState(nn.Module):
    """The last `n` rows fed to a token-shift site, oldest first, (B, n, D)."""

    def __init__(self, batch: int, n: int, dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.register_buffer("past", torch.zeros(batch, n, dim, dtype=dtype, device=device), persistent=False)


class LayerState(nn.Module):
    """Named parts of one layer's state: 'mixer', 'shift_mixer', 'shift_ffn', 'route'."""

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


def state_view(state: Optional[nn.Module], rows: slice = slice(None), span: Optional[int] = None
               ) -> Optional[nn.Module]:
    """A shallow copy of a state tree whose buffers are views of batch `rows`, so writes through
    the copy land in the original storage (prefill one prompt into its row of a batch cache).
    With `span`, its KV caches are also cut to positions 0..span-1: batched decoding at per-row
    positions reads the whole cache it is given (slots past a row's position are masked), so
    with every row below `span` the slots beyond need not be read at all. Other states (token
    shift, SSM) are not addressed by position and keep their whole rows."""
    if state is None:
        return None
    view = object.__new__(type(state))
    view.__dict__ = dict(state.__dict__)
    cut = span is not None and isinstance(state, KVCache)
    if cut and not 0 < span <= state.max_len:
        raise ValueError(f"a span of {span} positions does not fit a KV cache of {state.max_len}")
    view.__dict__["_buffers"] = {k: None if b is None else b[rows, :, :span] if cut else b[rows]
                                 for k, b in state._buffers.items()}
    view.__dict__["_modules"] = {k: state_view(m, rows, span) for k, m in state._modules.items()}
    if cut:
        view.max_len = span
    if isinstance(view, ModelCache):
        view.batch = len(range(*rows.indices(state.batch)))
        if span is not None:
            view.max_len = min(span, state.max_len)
    return view


def recurrent_buffers(state: nn.Module) -> list[torch.Tensor]:
    """Buffers of every state other than KV caches (token-shift rows, SSM states, routing
    counters). Unlike a KV cache, whose slots are addressed by position, these summarise the
    whole past: they start at zero for a new sequence and are restored to undo tokens."""
    out = []
    for module in state.modules():
        if not isinstance(module, KVCache):
            out.extend(b for b in module.buffers(recurse=False) if b is not None)
    return out


def reset_recurrent(state: nn.Module) -> None:
    """Zero the recurrent states so a cache can serve new sequences (KV slots need no reset:
    reads never go past the positions written for the current sequence)."""
    for buf in recurrent_buffers(state):
        buf.zero_()
