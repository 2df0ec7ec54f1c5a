"""Reading checkpoints of format version 1 (configs with `extras`, option-dependent tensor names).

Offers `upgrade_config(d)` (a version-1 model config dict -> the current layout, unchanged when
already current), `config_version(d)` and `upgrade_state_dict(state, d)` (version-1 tensor names ->
current ones). Both run once, when a checkpoint is loaded; nothing else knows the old layout.

Version 1 differed in two ways:
- Families lived in `extras` ({'moe': ..., 'mamba': ..., 'layout': {'attention_every': 8,
  'attention_offset': 4, 'moe_every': 2, ...}, 'linear': {family: kind}}) and the layout was
  decided by which keys were present.
- Tensor names depended on options: a sequential block wrapped each sublayer in a residual
  module (`layers.i.mixer.fn.wqkv`, `layers.i.mixer.norm`), a parallel block did not
  (`layers.i.mixer.wqkv`, `layers.i.norm`), and Mixture-of-Depths wrapped the whole block
  (`layers.i.block.…`, `layers.i.router`, `layers.i.predictor`).
"""

from __future__ import annotations

import copy
import re

from andromeda.errors import ConfigError


def config_version(d: dict) -> int:
    """The stored `format_version`; without one, 1 if the dict has version 1's `extras` (every
    version-1 config file does), else the current layout (hand-written dicts, presets)."""
    if "format_version" in d:
        return _int_field(d, "format_version")
    return 1 if "extras" in d else 2


def _int_field(d: dict, key: str, default: int = 0) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected int, got {type(value).__name__}")
    return value


def _pattern(depth: int, every: int, offset: int, hit: str, miss: str) -> str:
    """The cycled pattern of version 1's (every, offset) rule: `hit` where i % every == offset."""
    if every <= 0:
        return miss
    names = [hit if i == offset else miss for i in range(every)]
    return ",".join(names)


def upgrade_config(d: dict) -> dict:
    if not isinstance(d, dict) or config_version(d) >= 2:
        return d
    d = copy.deepcopy(d)
    extras = d.pop("extras", None) or {}
    if not isinstance(extras, dict):
        raise ConfigError(f"extras must be a mapping, got {type(extras).__name__}")
    known = {"layout", "linear", "moe", "moa", "mamba", "mod"}
    unknown = sorted(set(extras) - known)
    if unknown:
        raise ConfigError(f"unknown config key in extras: {', '.join(unknown)}")
    lay = dict(extras.get("layout") or {})
    depth = _int_field(d, "depth", 4)
    attention = "moa" if "moa" in extras else "attention"
    attn_every = lay.get("attention_every")
    if attn_every is None:
        attn_every = 0 if "mamba" in extras else 1
    layout = {"mixer": _pattern(depth, attn_every, lay.get("attention_offset", 0), attention, "mamba")}
    if "moe" in extras:
        layout["ffn"] = _pattern(depth, lay.get("moe_every", 1), lay.get("moe_offset", 0), "moe", "dense")
    if "mod" in extras:
        layout["routing"] = _pattern(depth, lay.get("mod_every", 2), lay.get("mod_offset", 1), "mod", "none")
    d["layout"] = layout
    if extras.get("linear"):
        d["linear"] = dict(extras["linear"])
    for family in ("moe", "moa", "mamba", "mod"):
        if family in extras:
            d[family] = dict(extras[family] or {})
    # A version-1 section that its layout never used (e.g. moe with moe_every=0) was ignored.
    used = {"moe": "moe" in layout.get("ffn", ""), "moa": "moa" in layout["mixer"],
            "mamba": "mamba" in layout["mixer"], "mod": "mod" in layout.get("routing", "")}
    for family, is_used in used.items():
        if not is_used:
            d.pop(family, None)
    d["format_version"] = 2
    return d


_SUBLAYER = re.compile(r"^layers\.(\d+)\.(mixer|ffn)\.(fn|norm)\.(.*)$")
_PARALLEL_NORM = re.compile(r"^layers\.(\d+)\.norm\.(.*)$")
_MOD_PARTS = re.compile(r"^layers\.(\d+)\.(router|predictor)\.(.*)$")


def upgrade_name(name: str, parallel: bool) -> str:
    """One version-1 tensor name -> its current name."""
    name = re.sub(r"^layers\.(\d+)\.block\.", r"layers.\1.", name, count=1)  # MoD wrapper
    m = _MOD_PARTS.match(name)
    if m:
        return f"layers.{m[1]}.route.{m[2]}.{m[3]}"
    if parallel:  # sublayers were direct children; one norm for both
        m = _PARALLEL_NORM.match(name)
        return f"layers.{m[1]}.mixer_norm.{m[2]}" if m else name
    m = _SUBLAYER.match(name)
    if m:
        return f"layers.{m[1]}.{m[2]}.{m[4]}" if m[3] == "fn" else f"layers.{m[1]}.{m[2]}_norm.{m[4]}"
    return name


def upgrade_state_dict(state: dict, model_config: dict) -> dict:
    """Rename the tensors of a version-1 checkpoint (`model_config` is its config dict as stored)."""
    if config_version(model_config) >= 2:
        return state
    parallel = bool((model_config.get("block") or {}).get("parallel", False))
    return {upgrade_name(k, parallel): v for k, v in state.items()}
