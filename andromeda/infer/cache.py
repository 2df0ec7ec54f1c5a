"""Cache helpers of the generation engine, on the model's state types (andromeda.model.state).

- `batch_rows(cache, start, stop, span=None)`: the cache of sequences start..stop-1 of a batch
  cache, sharing its storage, so a prompt can be prefilled alone into its row of a batch that
  then decodes together; with `span`, reading and writing cache positions 0..span-1 only.
- `copy_positions(cache, src, dst, start, stop)`: copy the keys/values of positions
  start..stop-1 from batch row src to row dst (a prompt prefix another sequence prefilled).
- `reset_recurrent(cache)`: zero the states that are not addressed by position (token shift,
  SSM, routing counts) before a cache serves new sequences.
"""

from __future__ import annotations

from typing import Optional

from andromeda.model.state import KVCache, ModelCache, recurrent_buffers, reset_recurrent, state_view


def batch_rows(cache: ModelCache, start: int, stop: int, span: Optional[int] = None) -> ModelCache:
    return state_view(cache, slice(start, stop), span)


def copy_positions(cache: ModelCache, src: int, dst: int, start: int, stop: int) -> None:
    for module in cache.modules():
        if isinstance(module, KVCache):
            module.k[dst, :, start:stop] = module.k[src, :, start:stop]
            module.v[dst, :, start:stop] = module.v[src, :, start:stop]


__all__ = ["ModelCache", "batch_rows", "copy_positions", "recurrent_buffers", "reset_recurrent"]
