"""How linear layers run one-row products (small-batch decoding) on CPU.

Decoding one token multiplies one row by every weight matrix, so each step streams all the
weights from memory; the product's speed is the speed at which it reads them. Measured on
the development machine (2-core AMD EPYC, AVX-512, float32, the 43 MB of weights of the
benchmark model in benchmarks/RESULTS.md, one thread):

- MKL's GEMV (`F.linear`) reads a weight in nn.Linear's (out, in) layout at ~10 GB/s and a
  widening one (out > in) stored input-major at ~15 GB/s; narrowing ones are faster as
  they are. Eager decoding therefore stores widening weights input-major.
- Inside a compiled graph, the same product written as `(x[..., None, :] * W).sum(-1)` over
  the (out, in) layout becomes one vectorised Inductor reduction along W's contiguous
  rows, at ~28 GB/s, close to a plain `W.sum()`, and fused with its neighbours
  (1.4 ms against 2.7 ms for all 25 products). `RowLinear` does that, and only there.

`prepare_cpu_linears(model, compiled)` picks the layout and the class for the mode (a model
prepared for compiled decoding keeps that preparation). Values, shapes, parameter objects and
state-dict names never change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.linear import compiled_few_rows


class RowLinear(nn.Linear):
    """nn.Linear whose products of at most REDUCTION_MAX_ROWS rows, when traced by
    torch.compile on CPU, are an explicit multiply-and-sum (see the module docstring).
    Anything else (eager calls, more rows, other devices) is the plain `F.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled_few_rows(x):
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def prepare_cpu_linears(model: nn.Module, compiled: bool) -> None:
    """Set every dense linear's class and weight layout for eager or compiled decoding.
    A weight tied to an embedding keeps its layout (the embedding gathers its rows).

    Once prepared for compiled decoding, a model stays so: a compiled step may skip its
    guards (see DecodeStep), so its weights must not change layout under it when an eager
    engine is later made over the same model. Eager decoding of such a model is correct,
    only slower (MKL over the (out, in) layout)."""
    if not compiled and any(type(m) is RowLinear for m in model.modules()):
        return
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for module in model.modules():
            if type(module) not in (nn.Linear, RowLinear):
                continue
            # RowLinear adds no state, so swapping the class keeps parameters, hooks and
            # tied weights exactly as they are.
            module.__class__ = RowLinear if compiled else nn.Linear
            w = module.weight
            if id(w) in embeddings:
                continue
            if compiled and not w.is_contiguous():
                w.data = w.data.contiguous()
            elif not compiled and w.shape[0] > w.shape[1] and w.is_contiguous():
                w.data = w.data.t().contiguous().t()  # widening: input-major for MKL's GEMV


