"""Typed dataclass configs from plain data: the machinery the model and training configs share.

Offers:
- `build(typ, data, prefix)`: a dataclass from a (nested) dict, refusing unknown keys and values
  of the wrong type by their dotted name (`attention.heads='two': expected int`).
- `apply_overrides(cfg, {"attention.heads": "4"})`: a copy of a config with dotted `--set`
  overrides, each string converted to its field's declared type. `key=null` clears an optional
  field; on an optional sub-config that is unset (say `moe`), `moe.num_experts=8` creates it.

Written by hand: the configs are a few small dataclasses, and what a user needs from errors
(the dotted key and the expected type) is easier to give here than through a schema library.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union

from andromeda.errors import ConfigError

_NONE_WORDS = ("none", "null")


def _optional_inner(hint) -> tuple[bool, Any]:
    """(is Optional, the non-None type) of an annotation."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, hint


def _dataclass_of(hint):
    _, inner = _optional_inner(hint)
    return inner if dataclasses.is_dataclass(inner) else None


def _type_name(hint) -> str:
    optional, inner = _optional_inner(hint)
    name = getattr(inner, "__name__", str(inner).replace("typing.", ""))
    return f"{name} or null" if optional else name


def _check_type(value: Any, hint, key: str) -> Any:
    """Return value (ints widened to float where a float is declared) or raise naming the key."""
    optional, inner = _optional_inner(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null (expected {_type_name(hint)})")
    ok = True
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, inner):
            raise ConfigError(f"{key} must be a mapping of its fields, got {type(value).__name__} {value!r}")
    elif inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif inner is str:
        ok = isinstance(value, str)
    elif typing.get_origin(inner) in (list, tuple) or inner in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif inner is dict or typing.get_origin(inner) is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}, got {type(value).__name__}")
    return value


def build(typ, data: Any, prefix: str = ""):
    """Construct dataclass `typ` from a dict, refusing unknown keys and wrong types by name."""
    if dataclasses.is_dataclass(data) and isinstance(data, typ):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}{where}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(typ)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        sub = _dataclass_of(hints[k])
        if sub is not None and isinstance(v, dict):
            v = build(sub, v, key)
        elif sub is None or not dataclasses.is_dataclass(v):
            v = _check_type(v, hints[k], key)
        kwargs[k] = v
    return typ(**kwargs)


def _coerce(text: str, hint, key: str):
    """Turn a command-line string into the field's declared type."""
    text = text.strip()
    optional, inner = _optional_inner(hint)
    if text.lower() in _NONE_WORDS and optional:
        return None
    try:
        if inner is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner in (dict, list) or typing.get_origin(inner) in (dict, list):
            return json.loads(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {_type_name(hint)}") from None
    return text


def apply_overrides(cfg, overrides: dict[str, Any]):
    """Return a copy of dataclass config `cfg` with dotted `key=value` overrides applied.

    Values given as strings (as typed on the command line) are converted to the field's type;
    other values are taken as they are (and type-checked when the config is rebuilt)."""
    data = dataclasses.asdict(cfg)
    for key, raw in overrides.items():
        parts = key.split(".")
        node, typ = data, type(cfg)
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(typ)
            if part not in hints:
                where = ".".join(parts[:i])
                known = ", ".join(sorted(hints))
                raise ConfigError(f"unknown config key: {key}" + (f" ({where} has: {known})" if where else ""))
            hint = hints[part]
            if i == len(parts) - 1:
                node[part] = _coerce(raw, hint, key) if isinstance(raw, str) else raw
                break
            sub = _dataclass_of(hint)
            if sub is None:
                raise ConfigError(f"unknown config key: {key} ({'.'.join(parts[:i + 1])} has no sub-keys)")
            if node.get(part) is None:  # an unset optional section: start from its defaults
                node[part] = dataclasses.asdict(sub())
            node, typ = node[part], sub
    return build(type(cfg), data, "")
