"""Model configuration: one typed dataclass per option family.

`ModelConfig` is plain data: it round-trips through JSON (`to_dict` / `from_dict`),
takes dotted overrides (`apply_overrides(cfg, {"attention.heads": "4"})`) and checks
every impossible combination in `__post_init__` with a message that says what to change.
Layers read only their own sub-config, so a new option family is a new sub-config here
plus a new module, never a new branch in the core forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from andromeda.errors import ConfigError, check


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    check(value in allowed, f"{name}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}")


@dataclass
class AttentionConfig:
    heads: int = 8
    """Number of query heads."""
    kv_heads: Optional[int] = None
    """Key/value heads; None means `heads` (MHA), 1 is multi-query, anything between is GQA."""
    head_dim: Optional[int] = None
    """Per-head width; None means dim // heads."""
    qk_norm: str = "none"
    """'none', 'rms' or 'layer': normalise q and k per head before the dot product."""
    qk_norm_dim_scale: bool = True
    """With qk_norm: learn a per-dimension scale on q and k (the spec's attn_qk_norm_dim_scale)."""
    qk_norm_scale: Optional[float] = None
    """Softmax scale with qk_norm; None means 1/sqrt(head_dim)."""
    bias: bool = False
    """Bias on the q/k/v and output projections."""
    dropout: float = 0.0
    """Dropout on attention probabilities (training only)."""
    backend: str = "auto"
    """'auto' (SDPA for plain causal, FlexAttention on GPU for score modifications, reference
    math on CPU), 'sdpa', 'flex' or 'reference'."""
    window: Optional[int] = None
    """Sliding-window size (tokens a query may see, itself included); None is full causal."""

    def __post_init__(self):
        check(self.heads >= 1, f"attention.heads must be >= 1, got {self.heads}")
        if self.kv_heads is None:
            self.kv_heads = self.heads
        check(self.kv_heads >= 1, f"attention.kv_heads must be >= 1, got {self.kv_heads}")
        check(self.heads % self.kv_heads == 0,
               f"attention.heads ({self.heads}) must be divisible by attention.kv_heads ({self.kv_heads})")
        _one_of("attention.qk_norm", self.qk_norm, ("none", "rms", "layer"))
        _one_of("attention.backend", self.backend, ("auto", "sdpa", "flex", "reference"))
        check(0.0 <= self.dropout < 1.0, f"attention.dropout must be in [0, 1), got {self.dropout}")
        check(self.head_dim is None or self.head_dim >= 1, "attention.head_dim must be >= 1")
        check(self.window is None or self.window >= 1, "attention.window must be >= 1 or null")


@dataclass
class PositionConfig:
    kind: str = "rope"
    """'none', 'learned' (absolute embedding), 'rope' or 'xpos' (rotary with decay)."""
    rope_theta: float = 10000.0
    rope_dim: Optional[int] = None
    """Rotary width per head (even); None means the whole head."""
    rope_scaling: str = "none"
    """Context extension: 'none', 'linear' (position interpolation), 'ntk' (NTK-aware base
    change), 'yarn', or 'llama3' (Llama 3.1 frequency-dependent scaling)."""
    rope_factor: float = 1.0
    """Extension factor for rope_scaling (new context / original context)."""
    original_max_seq_len: Optional[int] = None
    """Context the model was trained at, for yarn/llama3; None means max_seq_len / rope_factor."""
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    xpos_scale_base: float = 512.0
    """xPos decay length (Sun et al. 2022, 'A Length-Extrapolatable Transformer')."""
    xpos_max_power: float = 32.0
    """Clamp on |position - centre| / xpos_scale_base so that the q and k scales stay finite at
    very long contexts; beyond it the decay stops growing (plain rotary)."""
    alibi_heads: int = 0
    """Heads that get an ALiBi bias (Press et al. 2021); 0 = none, -1 = all. These are the
    first heads, as in the spec's alibi_num_heads; the other heads keep only rotary."""

    def __post_init__(self):
        _one_of("position.kind", self.kind, ("none", "learned", "rope", "xpos"))
        _one_of("position.rope_scaling", self.rope_scaling, ("none", "linear", "ntk", "yarn", "llama3"))
        check(self.rope_factor >= 1.0, f"position.rope_factor must be >= 1, got {self.rope_factor}")
        check(self.rope_theta > 0, "position.rope_theta must be > 0")
        check(self.rope_dim is None or (self.rope_dim > 0 and self.rope_dim % 2 == 0),
               f"position.rope_dim must be a positive even number, got {self.rope_dim}")
        check(self.alibi_heads >= -1, "position.alibi_heads must be -1 (all), 0 (none) or a head count")
        check(self.rope_scaling == "none" or self.kind in ("rope", "xpos"),
               f"position.rope_scaling={self.rope_scaling!r} needs position.kind 'rope' or 'xpos'")

    @property
    def rotary(self) -> bool:
        return self.kind in ("rope", "xpos")


@dataclass
class NormConfig:
    kind: str = "rms"
    """'rms' (RMSNorm) or 'layer' (LayerNorm)."""
    placement: str = "pre"
    """'pre', 'post', or 'deepnorm' (post-norm with DeepNet residual scaling and init)."""
    eps: float = 1e-5
    bias: bool = False
    """Bias in LayerNorm (ignored by RMSNorm, which has none)."""

    def __post_init__(self):
        _one_of("norm.kind", self.kind, ("rms", "layer"))
        _one_of("norm.placement", self.placement, ("pre", "post", "deepnorm"))
        check(self.eps > 0, "norm.eps must be > 0")


@dataclass
class MLPConfig:
    kind: str = "swiglu"
    """'swiglu', 'geglu', 'gelu' or 'relu'."""
    hidden_dim: Optional[int] = None
    """Hidden width; None means 4*dim for plain MLPs and 8/3*dim rounded up to multiple_of for GLUs."""
    multiple_of: int = 64
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        _one_of("mlp.kind", self.kind, ("swiglu", "geglu", "gelu", "relu"))
        check(self.hidden_dim is None or self.hidden_dim >= 1, "mlp.hidden_dim must be >= 1")
        check(self.multiple_of >= 1, "mlp.multiple_of must be >= 1")
        check(0.0 <= self.dropout < 1.0, "mlp.dropout must be in [0, 1)")

    @property
    def gated(self) -> bool:
        return self.kind in ("swiglu", "geglu")

    def resolved_hidden(self, dim: int) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        if not self.gated:
            return 4 * dim
        hidden = int(8 * dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


@dataclass
class BlockConfig:
    parallel: bool = False
    """PaLM-style parallel block: attention and MLP read the same normed input."""
    shift_tokens: int = 0
    """Token shift (x-transformers' shift_tokens=n): channels split into n+1 groups, group i
    shifted i positions back in time (causal), before attention and before the MLP."""
    checkpoint_activations: bool = False
    """Recompute each block in the backward pass to save activation memory."""
    residual_dropout: float = 0.0

    def __post_init__(self):
        check(self.shift_tokens >= 0, "block.shift_tokens must be >= 0")
        check(0.0 <= self.residual_dropout < 1.0, "block.residual_dropout must be in [0, 1)")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    max_seq_len: int = 1024
    dim: int = 256
    depth: int = 4
    tie_embeddings: bool = False
    embed_dropout: float = 0.0
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    extras: dict = field(default_factory=dict)
    """Option families added by later modules (MoE, Mamba, ...) keyed by family name; each
    family validates its own entry when its layers are built."""

    def __post_init__(self):
        for name, typ in (("attention", AttentionConfig), ("position", PositionConfig), ("norm", NormConfig),
                          ("mlp", MLPConfig), ("block", BlockConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(typ, value, name))
        check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        check(self.dim >= 1 and self.depth >= 1, "dim and depth must be >= 1")
        check(0.0 <= self.embed_dropout < 1.0, "embed_dropout must be in [0, 1)")
        a, p = self.attention, self.position
        if a.head_dim is None:
            check(self.dim % a.heads == 0,
                   f"dim ({self.dim}) must be divisible by attention.heads ({a.heads}), or set attention.head_dim")
        hd = self.head_dim
        if p.rotary:
            rd = p.rope_dim or hd
            check(rd % 2 == 0 and rd <= hd, f"rotary width {rd} must be even and <= head_dim {hd}")
        check(p.alibi_heads <= a.heads, f"position.alibi_heads ({p.alibi_heads}) exceeds attention.heads ({a.heads})")
        if self.norm.placement == "deepnorm":
            check(not self.block.parallel, "norm.placement='deepnorm' does not combine with block.parallel")
        if self.block.shift_tokens:
            check(self.dim >= self.block.shift_tokens + 1,
                   f"block.shift_tokens={self.block.shift_tokens} needs dim >= {self.block.shift_tokens + 1}")

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.dim // self.attention.heads

    @property
    def alibi_heads(self) -> int:
        n = self.position.alibi_heads
        return self.attention.heads if n == -1 else n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _build(cls, d, "")


def _build(typ, d: dict, prefix: str):
    """Construct dataclass `typ` from a dict, refusing unknown keys by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}{where}: {', '.join(unknown)}")
    hints = typing.get_type_hints(typ)
    kwargs = {}
    for k, v in d.items():
        sub = hints[k]
        if dataclasses.is_dataclass(sub) and isinstance(v, dict):
            v = _build(sub, v, f"{prefix}.{k}" if prefix else k)
        kwargs[k] = v
    try:
        return typ(**kwargs)
    except TypeError as e:  # e.g. a wrong type that the dataclass cannot take
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _coerce(value: str, annotation: Any, key: str):
    """Turn a command-line string into the field's declared type."""
    text = value.strip()
    hint = str(annotation)
    if text.lower() in ("none", "null") and ("Optional" in hint or "None" in hint):
        return None
    try:
        if "bool" in hint:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in hint and "float" not in hint:
            return int(text)
        if "float" in hint:
            return float(text)
        if "dict" in hint:
            return json.loads(text)
    except ValueError:
        wanted = annotation.__name__ if isinstance(annotation, type) else hint.replace("typing.", "")
        raise ConfigError(f"{key}={value!r}: expected {wanted}") from None
    return text


def apply_overrides(cfg, overrides: dict[str, str]):
    """Return a copy of dataclass config `cfg` with dotted `key=value` overrides applied.

    Values are strings (as typed on the command line) and are converted to the field type;
    `extras.moe.num_experts=8` style keys reach into the free-form extras dict (JSON values).
    """
    data = dataclasses.asdict(cfg)
    for key, raw in overrides.items():
        parts = key.split(".")
        node, typ = data, type(cfg)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if typ is None:  # inside a free-form dict
                if last:
                    try:
                        node[part] = json.loads(raw)
                    except (json.JSONDecodeError, TypeError):
                        node[part] = raw
                else:
                    node = node.setdefault(part, {})
                continue
            hints = typing.get_type_hints(typ)
            if part not in hints:
                raise ConfigError(f"unknown config key: {key}")
            if last:
                node[part] = _coerce(raw, hints[part], key) if isinstance(raw, str) else raw
            else:
                sub = hints[part]
                typ = sub if dataclasses.is_dataclass(sub) else None
                node = node.setdefault(part, {})
    return _build(type(cfg), data, "")
