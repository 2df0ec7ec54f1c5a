"""Which layer gets which mixer, which FFN, and which blocks are depth-routed.

Offers `LayoutConfig` (validated from `cfg.extras['layout']`), and `mixer_for_layer`,
`ffn_for_layer`, `mod_for_layer`, read by `block.py` and `mlp.py`.

Rules (layer i, 0-based):
- mixer: attention where `i % attention_every == attention_offset`, Mamba elsewhere
  (Jamba, Lieber et al. 2024, uses one attention layer in eight, at offset 4). Attention
  layers are Mixture of Attention Heads when `extras['moa']` is present.
  `attention_every = 0` means no attention at all (pure Mamba). Default: 1 (all attention)
  without `extras['mamba']`, 0 with it.
- FFN: MoE where `i % moe_every == moe_offset` when `extras['moe']` is present (Jamba: every
  second layer, offset 1); dense elsewhere. `moe_every = 0` means no MoE layer.
- Mixture-of-Depths: blocks where `i % mod_every == mod_offset` when `extras['mod']` is
  present; default every other block from the second (Raposo et al. 2024).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from andromeda.errors import ConfigError, check
from andromeda.model.config import ModelConfig


def parse_family(typ, cfg: ModelConfig, family: str):
    """Build dataclass `typ` from `cfg.extras[family]` (absent -> defaults), naming unknown keys."""
    raw = cfg.extras.get(family) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"extras.{family} must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in extras.{family}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    try:
        return typ(**raw)
    except TypeError as e:
        raise ConfigError(f"extras.{family}: {e}") from None



@dataclass
class LayoutConfig:
    attention_every: Optional[int] = None
    """Attention on layers with i % attention_every == attention_offset, Mamba elsewhere;
    0 = no attention; None = 1 without extras.mamba, 0 with it."""
    attention_offset: int = 0
    moe_every: int = 1
    """MoE FFN on layers with i % moe_every == moe_offset (needs extras.moe); 0 = none."""
    moe_offset: int = 0
    mod_every: int = 2
    """Mixture-of-Depths routing around blocks with i % mod_every == mod_offset (needs extras.mod)."""
    mod_offset: int = 1

    def __post_init__(self):
        for name in ("attention_every", "moe_every", "mod_every"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 0),
                  f"extras.layout.{name} must be an integer >= 0, got {value!r}")
        for name, every in (("attention_offset", self.attention_every), ("moe_offset", self.moe_every),
                            ("mod_offset", self.mod_every)):
            offset = getattr(self, name)
            check(isinstance(offset, int) and offset >= 0, f"extras.layout.{name} must be an integer >= 0")
            check(not every or offset < every,
                  f"extras.layout.{name}={offset} must be smaller than its period {every}")


def layout(cfg: ModelConfig) -> LayoutConfig:
    lay = parse_family(LayoutConfig, cfg, "layout")
    if lay.attention_every is None:
        lay.attention_every = 0 if "mamba" in cfg.extras else 1
    return lay


def _hits(i: int, every: int, offset: int) -> bool:
    return every > 0 and i % every == offset


def mixer_for_layer(cfg: ModelConfig, i: int) -> str:
    lay = layout(cfg)
    if _hits(i, lay.attention_every, lay.attention_offset):
        return "moa" if "moa" in cfg.extras else "attention"
    return "mamba"


def ffn_for_layer(cfg: ModelConfig, i: int) -> str:
    lay = layout(cfg)
    return "moe" if "moe" in cfg.extras and _hits(i, lay.moe_every, lay.moe_offset) else "dense"


def mod_for_layer(cfg: ModelConfig, i: int) -> bool:
    lay = layout(cfg)
    return "mod" in cfg.extras and _hits(i, lay.mod_every, lay.mod_offset)
