"""Cache helpers of the generation engine, on the model's state types (andromeda.model.state).

- `batch_rows(cache, start, stop)`: the cache of sequences start..stop-1 of a batch cache,
  sharing its storage, so a prompt can be prefilled alone into its row of a batch that then
  decodes together.
- `first_positions(cache, span)`: the same cache reading and writing positions 0..span-1 only.
- `reset_recurrent(cache)`: zero the states that are not addressed by position (token shift,
  SSM, routing counts) before a cache serves new sequences.
"""

from __future__ import annotations

from andromeda.model.state import ModelCache, recurrent_buffers, reset_recurrent, row_view, span_view


def batch_rows(cache: ModelCache, start: int, stop: int) -> ModelCache:
    return row_view(cache, slice(start, stop))


def first_positions(cache: ModelCache, span: int) -> ModelCache:
    return span_view(cache, span)


__all__ = ["ModelCache", "batch_rows", "first_positions", "recurrent_buffers", "reset_recurrent"]
