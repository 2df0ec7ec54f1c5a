"""Linear layers, chosen per module family.

Every projection in the model is made by `make_linear(cfg, family, ...)`, where family is
one of 'attention', 'mlp', 'mixer', 'router', 'head'. The config's `linear` section maps each
family to a linear kind ('dense', a plain `nn.Linear`, or 'bitnet', BitNet's ternary linear).
New kinds are a row in `LINEARS` (and in config.LINEAR_KINDS).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from andromeda.model.config import ModelConfig

REDUCTION_MAX_ROWS = 4
"""Up to this many input rows (decoding batches of 1-4), a compiled CPU product as a reduction
beats the compiled `F.linear` over the same (out, in) layout; from 8 rows on it does not
(`benchmarks/cpu_gemv.py --rows N`)."""


def compiled_few_rows(x: torch.Tensor) -> bool:
    """True while torch.compile traces a product of at most REDUCTION_MAX_ROWS input rows on
    CPU (decoding a small batch). Linear layers then write the product as a multiply-and-sum,
    which Inductor turns into one streaming reduction over the weight per row
    (andromeda.infer.cpu_linears)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() <= REDUCTION_MAX_ROWS


def _dense(cfg: ModelConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


def _bitnet(cfg: ModelConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    from andromeda.model.bitlinear import BitLinear  # imported here: only BitNet configs need it
    return BitLinear(in_features, out_features, bias=bias)


LINEARS: dict[str, Callable[..., nn.Module]] = {"dense": _dense, "bitnet": _bitnet}


def linear_kind(cfg: ModelConfig, family: str) -> str:
    return getattr(cfg.linear, family)


def make_linear(cfg: ModelConfig, family: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    return LINEARS[linear_kind(cfg, family)](cfg, in_features, out_features, bias)
