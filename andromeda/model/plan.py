"""The layer plan: what each layer of a model is made of, and the tables of layer kinds.

Offers:
- `MIXERS`, `FFNS`, `ROUTINGS`: name -> `Kind` (where the module lives, which config section
  it needs). `register_mixer` / `register_ffn` add a kind; a new mixer is one module plus one
  `register_mixer` call (docs/model.md walks through an example, which tests/test_plan.py runs).
- `LayerSpec(index, mixer, ffn, routing)` and `expand(cfg)`: the plan, from the `layout`
  patterns of a config, validated against the tables (an unknown name is refused with the key).
- `families_used(cfg)`: the config sections the plan needs (e.g. {'mamba', 'moe'}).
- `describe(cfg)`: the plan as text lines, for `andromeda presets --show`.

This module imports no torch, so configs validate without building anything; the classes are
imported when a layer is built (`Kind.load`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

from andromeda.errors import ConfigError


@dataclass(frozen=True)
class Kind:
    target: Union[str, Callable]
    """'package.module:Class', or the class (or any callable (cfg, layer_idx) -> module) itself."""
    family: Optional[str] = None
    """The ModelConfig section this kind reads its options from (None: the core sections only)."""

    def load(self) -> Callable:
        if not isinstance(self.target, str):
            return self.target
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


MIXERS: dict[str, Kind] = {
    "attention": Kind("andromeda.model.attention:Attention"),
    "moa": Kind("andromeda.model.moa:MixtureOfAttentionHeads", family="moa"),
    "mamba": Kind("andromeda.model.mamba:Mamba", family="mamba"),
}
FFNS: dict[str, Kind] = {
    "dense": Kind("andromeda.model.mlp:dense_ffn"),
    "moe": Kind("andromeda.model.moe:MoE", family="moe"),
}
ROUTINGS: dict[str, Kind] = {
    "none": Kind("andromeda.model.mod:no_routing"),
    "mod": Kind("andromeda.model.mod:MixtureOfDepths", family="mod"),
}
TABLES = {"mixer": MIXERS, "ffn": FFNS, "routing": ROUTINGS}
FAMILY_LAYOUT_KEY = {"moe": "ffn", "moa": "mixer", "mamba": "mixer", "mod": "routing"}


def register_mixer(name: str, target: Union[str, Callable], family: Optional[str] = None) -> None:
    """Make `name` usable in `layout.mixer`. `target(cfg, layer_idx)` builds the mixer, a
    `andromeda.model.layer.Mixer`."""
    MIXERS[name] = Kind(target, family)


def register_ffn(name: str, target: Union[str, Callable], family: Optional[str] = None) -> None:
    """Make `name` usable in `layout.ffn`; `target(cfg, layer_idx)` builds an `andromeda.model.layer.FFN`."""
    FFNS[name] = Kind(target, family)


@dataclass(frozen=True)
class LayerSpec:
    index: int
    mixer: str
    ffn: str
    routing: str

    def __str__(self) -> str:
        route = "" if self.routing == "none" else f"  [{self.routing}]"
        return f"{self.index:3d}: {self.mixer} + {self.ffn}{route}"


def parse_pattern(pattern: str, key: str) -> list[str]:
    """'mamba*4,attention,mamba*3' -> ['mamba', 'mamba', 'mamba', 'mamba', 'attention', ...]."""
    names: list[str] = []
    for part in str(pattern).replace(" ", "").split(","):
        name, star, count = part.partition("*")
        if not name:
            raise ConfigError(f"layout.{key}={pattern!r}: empty name in the pattern")
        n = 1
        if star:
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(f"layout.{key}={pattern!r}: '{part}' needs a repeat count >= 1 after '*'")
            n = int(count)
        names.extend([name] * n)
    table = TABLES[key]
    unknown = sorted({n for n in names if n not in table})
    if unknown:
        raise ConfigError(f"layout.{key}={pattern!r}: unknown {key} kind {unknown[0]!r}; "
                          f"choose from {', '.join(sorted(table))}")
    return names


def expand(cfg) -> tuple[LayerSpec, ...]:
    """The per-layer plan of a config: each pattern cycled over `cfg.depth` layers."""
    columns = {key: parse_pattern(getattr(cfg.layout, key), key) for key in TABLES}
    return tuple(LayerSpec(i, *(columns[key][i % len(columns[key])] for key in TABLES)) for i in range(cfg.depth))


def families_used(cfg) -> set[str]:
    out = set()
    for spec in expand(cfg):
        for key in TABLES:
            family = TABLES[key][getattr(spec, key)].family
            if family:
                out.add(family)
    return out


def describe(cfg) -> list[str]:
    """One line per layer, runs of identical layers folded: '  0-3: attention + dense'."""
    lines, plan = [], expand(cfg)
    start = 0
    for i in range(1, len(plan) + 1):
        same = i < len(plan) and (plan[i].mixer, plan[i].ffn, plan[i].routing) == (
            plan[start].mixer, plan[start].ffn, plan[start].routing)
        if same:
            continue
        s = plan[start]
        span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
        route = "" if s.routing == "none" else f"  [{s.routing}]"
        lines.append(f"{span:>7}: {s.mixer} + {s.ffn}{route}")
        start = i
    return lines
