"""Linear layers, chosen per module family.

Every projection in the model is made by `make_linear(cfg, family, ...)`, where family is
one of 'attention', 'mlp', 'mixer', 'router', 'head'. A config may map a family to another
linear kind (for example BitNet's ternary linear) through `cfg.extras['linear']`, a dict
{family: kind}; the default is a plain dense `nn.Linear`. New kinds register in `LINEARS`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from andromeda.errors import ConfigError
from andromeda.model.config import ModelConfig


def _dense(cfg: ModelConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


LINEARS: dict[str, Callable[..., nn.Module]] = {"dense": _dense}
FAMILIES = ("attention", "mlp", "mixer", "router", "head")


def linear_kind(cfg: ModelConfig, family: str) -> str:
    table = cfg.extras.get("linear", {}) or {}
    unknown = sorted(set(table) - set(FAMILIES))
    if unknown:
        raise ConfigError(f"extras.linear has unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    return table.get(family, "dense")


def make_linear(cfg: ModelConfig, family: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    kind = linear_kind(cfg, family)
    if kind not in LINEARS:
        _load_optional_kinds()
    if kind not in LINEARS:
        raise ConfigError(f"unknown linear kind {kind!r} for {family}; choose one of {', '.join(sorted(LINEARS))}")
    return LINEARS[kind](cfg, in_features, out_features, bias)


def _load_optional_kinds() -> None:
    """Import modules that add linear kinds (kept lazy so the dense path imports nothing)."""
    try:
        import andromeda.model.bitlinear  # noqa: F401  (registers 'bitnet')
    except ImportError:
        pass
