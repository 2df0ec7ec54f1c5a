"""Model configuration: one typed dataclass per option family, and the layer plan they make.

`ModelConfig` is plain data. It round-trips through JSON (`to_dict` / `from_dict`), takes
dotted overrides (`apply_overrides(cfg, {"attention.heads": "4"})`), and refuses, when it is
made, unknown keys, values of the wrong type and impossible combinations, with a message that
names the key and says what to change.

Every layer is a block of three choices, spelled out by `cfg.plan` (see andromeda.model.plan):
a mixer ('attention', 'moa', 'mamba'), a feed-forward ('dense', 'moe') and a routing ('none',
'mod'). The `layout` section gives one short pattern per choice, cycled over the depth:
Jamba's one attention layer in eight is `layout.mixer = "mamba*4,attention,mamba*3"`. A family
section (`moe`, `moa`, `mamba`, `mod`) holds the options of its layers: it is filled with its
defaults when the plan uses the kind, and refused when no layer uses it, so a setting never
goes silently unused.

Configs written before format version 2 kept the families in a free-form `extras` dict;
`from_dict` converts them (andromeda.model.compat).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from andromeda import configtools
from andromeda.configtools import apply_overrides
from andromeda.errors import check
from andromeda.model import plan as layer_plan

FORMAT_VERSION = 2
"""Version of the config layout and tensor names; checkpoints of older versions are converted on load."""


def _one_of(name: str, value: Any, allowed) -> None:
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
    """'none', 'rms', 'layer' or 'l2': normalise q and k per head before the dot product ('l2'
    divides by the Euclidean norm, as x-transformers' cosine-similarity attention does)."""
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
        _one_of("attention.qk_norm", self.qk_norm, ("none", "rms", "layer", "l2"))
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
    rotate_values: bool = False
    """Rotate the values too, with the keys' rotation and xPos scale (x-transformers 1.16 does;
    needed to import its models)."""
    xpos_value_centre: str = "fixed"
    """Where the values' xPos scale is 1 when values are rotated. The centre cancels in q.k but
    not in the values. 'fixed': max_seq_len // 2, the centre x-transformers uses on a call of
    max_seq_len tokens (its training length); the model stays causal and cacheable. 'call': the
    middle of each call, (last position + 1) // 2, as x-transformers computes it on every call:
    exact parity at any length, but a token's logits then depend on where the call ends, so it
    cannot decode with a KV cache (for checking imports, not for serving)."""

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
        check(not self.rotate_values or self.rotary,
              "position.rotate_values needs position.kind 'rope' or 'xpos'")
        _one_of("position.xpos_value_centre", self.xpos_value_centre, ("fixed", "call"))
        check(self.xpos_value_centre == "fixed" or (self.rotate_values and self.kind == "xpos"),
              "position.xpos_value_centre='call' needs position.kind='xpos' and position.rotate_values=true")

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
    """'swiglu', 'geglu' (gated), 'gelu', 'silu' or 'relu' (plain)."""
    hidden_dim: Optional[int] = None
    """Hidden width; None means 4*dim for plain MLPs and 8/3*dim rounded up to multiple_of for GLUs."""
    multiple_of: int = 64
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        _one_of("mlp.kind", self.kind, ("swiglu", "geglu", "gelu", "silu", "relu"))
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
    residual_gain: bool = False
    """A learned per-channel gain (init 1) on each skip path, times DeepNorm's alpha where that
    applies (x-transformers' scale_residual, which its deepnorm turns on)."""

    def __post_init__(self):
        check(self.shift_tokens >= 0, "block.shift_tokens must be >= 0")
        check(0.0 <= self.residual_dropout < 1.0, "block.residual_dropout must be in [0, 1)")


LINEAR_KINDS = ("dense", "bitnet")


@dataclass
class LinearConfig:
    """Which linear layer each family of projections uses: 'dense' (nn.Linear) or 'bitnet'
    (BitNet b1.58 ternary weights, andromeda.model.bitlinear)."""

    attention: str = "dense"
    """q/k/v and output projections (and Mixture of Attention Heads' experts)."""
    mlp: str = "dense"
    """Feed-forward projections (and MoE experts)."""
    mixer: str = "dense"
    """Mamba's in/out projections."""
    router: str = "dense"
    """MoE / MoA / Mixture-of-Depths routers."""
    head: str = "dense"
    """The output head."""

    def __post_init__(self):
        for name in ("attention", "mlp", "mixer", "router", "head"):
            _one_of(f"linear.{name}", getattr(self, name), LINEAR_KINDS)


@dataclass
class LayoutConfig:
    """Patterns of layer kinds, cycled over the depth: comma-separated names, `name*n` repeats
    a name. `"dense,moe"` puts MoE on every odd layer; a pattern as long as the depth is the
    explicit per-layer list."""

    mixer: str = "attention"
    """Token mixers: 'attention', 'moa' (Mixture of Attention Heads) or 'mamba'."""
    ffn: str = "dense"
    """Feed-forwards: 'dense' (as `mlp`) or 'moe'."""
    routing: str = "none"
    """Routing around the whole block: 'none' or 'mod' (Mixture-of-Depths)."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (andromeda.model.moe)."""

    num_experts: int = 8
    top_k: int = 2
    hidden_dim: Optional[int] = None
    """Hidden width of each expert; None means the dense FFN width (mlp)."""
    shared_expert: bool = False
    """Add one always-active dense expert of width shared_hidden_dim (default: hidden_dim)."""
    shared_hidden_dim: Optional[int] = None
    normalize_top_k: bool = True
    """Renormalise the k selected gates to sum to 1 (Mixtral); False keeps raw softmax (Switch)."""
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    capacity_factor: Optional[float] = None
    """None: every token reaches its k experts. A number: each expert takes at most
    capacity_factor * tokens * k / experts assignments per call; the rest are dropped."""

    def __post_init__(self):
        check(self.num_experts >= 1, f"moe.num_experts must be >= 1, got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts,
              f"moe.top_k={self.top_k} must be between 1 and moe.num_experts ({self.num_experts})")
        check(self.hidden_dim is None or self.hidden_dim >= 1, "moe.hidden_dim must be >= 1")
        check(self.shared_hidden_dim is None or self.shared_hidden_dim >= 1, "moe.shared_hidden_dim must be >= 1")
        check(self.balance_loss_weight >= 0 and self.z_loss_weight >= 0, "moe loss weights must be >= 0")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"moe.capacity_factor must be > 0 or null, got {self.capacity_factor}")


@dataclass
class MoAConfig:
    """Mixture of Attention Heads (andromeda.model.moa)."""

    num_experts: int = 8
    top_k: int = 2
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self):
        check(self.num_experts >= 1, f"moa.num_experts must be >= 1, got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts,
              f"moa.top_k={self.top_k} must be between 1 and moa.num_experts ({self.num_experts})")
        check(self.balance_loss_weight >= 0 and self.z_loss_weight >= 0, "moa loss weights must be >= 0")


@dataclass
class MambaConfig:
    """Mamba-2 mixer (andromeda.model.mamba)."""

    d_state: int = 64
    """State size N per head."""
    d_conv: int = 4
    """Width of the causal depthwise convolution."""
    expand: int = 2
    """Inner width = expand * dim."""
    head_dim: int = 64
    """Channels per SSM head (P); heads = expand * dim / head_dim, each with its own decay."""
    ngroups: int = 1
    """Groups sharing B and C (like key/value heads in GQA)."""
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    conv_bias: bool = True
    use_kernels: bool = True
    """Use mamba_ssm's fused scan on CUDA when it is installed."""

    def __post_init__(self):
        for name in ("d_state", "d_conv", "expand", "head_dim", "ngroups", "chunk_size"):
            check(getattr(self, name) >= 1, f"mamba.{name} must be >= 1, got {getattr(self, name)}")
        check(0 < self.dt_min <= self.dt_max, "mamba needs 0 < dt_min <= dt_max")


@dataclass
class MoDConfig:
    """Mixture-of-Depths routing (andromeda.model.mod)."""

    capacity: float = 0.125
    """Share of a sequence's tokens that a routed block processes in training (paper: 12.5%)."""
    predictor_hidden: int = 64
    """Hidden width of the causal predictor MLP used at inference; 0 makes it linear."""
    predictor_loss_weight: float = 1.0
    """Weight of its BCE loss; it trains only the predictor (its input is detached)."""

    def __post_init__(self):
        check(0 < self.capacity <= 1, f"mod.capacity must be in (0, 1], got {self.capacity}")
        check(self.predictor_hidden >= 0, "mod.predictor_hidden must be >= 0")
        check(self.predictor_loss_weight >= 0, "mod.predictor_loss_weight must be >= 0")


FAMILY_SECTIONS = ("moe", "moa", "mamba", "mod")
"""Optional sections of ModelConfig, each present exactly when the layer plan uses its kind."""


@dataclass
class ModelConfig:
    vocab_size: int = 256
    max_seq_len: int = 1024
    dim: int = 256
    depth: int = 4
    tie_embeddings: bool = False
    head_bias: bool = False
    """A bias on the output head (x-transformers' to_logits has one)."""
    embed_dropout: float = 0.0
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    moe: Optional[MoEConfig] = None
    moa: Optional[MoAConfig] = None
    mamba: Optional[MambaConfig] = None
    mod: Optional[MoDConfig] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            sub = configtools._dataclass_of(f.type if not isinstance(f.type, str) else _HINTS[f.name])
            if sub is not None and isinstance(value, dict):
                setattr(self, f.name, configtools.build(sub, value, f.name))
        check(self.format_version == FORMAT_VERSION,
              f"format_version={self.format_version}: this version reads {FORMAT_VERSION} "
              "(older configs are converted by ModelConfig.from_dict)")
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
        check(not (self.block.residual_gain and self.block.parallel),
              "block.residual_gain is per sublayer; it does not combine with block.parallel")
        if self.block.shift_tokens:
            check(self.dim >= self.block.shift_tokens + 1,
                  f"block.shift_tokens={self.block.shift_tokens} needs dim >= {self.block.shift_tokens + 1}")
        self._check_families()

    def _check_families(self) -> None:
        """Fill the sections the plan uses, refuse the ones it does not, check combinations."""
        used = layer_plan.families_used(self)
        for name in FAMILY_SECTIONS:
            if name in used and getattr(self, name) is None:
                setattr(self, name, _HINT_TYPES[name]())
            elif name not in used and getattr(self, name) is not None:
                key = layer_plan.FAMILY_LAYOUT_KEY[name]
                raise configtools.ConfigError(
                    f"{name} is configured but no layer uses it (layout.{key}={getattr(self.layout, key)!r}); "
                    f"name '{name}' in layout.{key}, or drop the section (--set {name}=null)")
        a = self.attention
        if self.moa is not None:
            k = self.moa.top_k
            check(a.heads % k == 0, f"moa.top_k ({k}) must divide attention.heads ({a.heads})")
            check((a.heads // k) % a.kv_heads == 0,
                  f"attention.heads / moa.top_k ({a.heads // k}) must be divisible by "
                  f"attention.kv_heads ({a.kv_heads})")
            check(self.alibi_heads == 0,
                  "Mixture of Attention Heads does not support ALiBi; set position.alibi_heads=0")
        if self.mamba is not None:
            m = self.mamba
            inner = m.expand * self.dim
            check(inner % m.head_dim == 0,
                  f"mamba: expand*dim ({inner}) must be divisible by mamba.head_dim ({m.head_dim})")
            check((inner // m.head_dim) % m.ngroups == 0,
                  f"mamba: heads ({inner // m.head_dim}) must be divisible by mamba.ngroups ({m.ngroups})")
        if self.mod is not None:
            check(self.norm.placement == "pre",
                  "Mixture-of-Depths needs norm.placement='pre' (it scales the block's residual update)")
            check(self.position.xpos_value_centre == "fixed",
                  "position.xpos_value_centre='call' does not combine with Mixture-of-Depths "
                  "(routing changes where a block's call ends); use 'fixed'")

    @property
    def plan(self) -> tuple[layer_plan.LayerSpec, ...]:
        """What each layer is made of, expanded from `layout` (validated when the config is made)."""
        return layer_plan.expand(self)

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
        """Build from plain data, converting configs of older format versions first."""
        from andromeda.model.compat import upgrade_config

        return configtools.build(cls, upgrade_config(d), "")


_HINTS = None  # filled below, once the classes exist


def _resolve_hints():
    import typing

    hints = typing.get_type_hints(ModelConfig)
    return hints, {name: configtools._dataclass_of(hints[name]) for name in FAMILY_SECTIONS}


_HINTS, _HINT_TYPES = _resolve_hints()
_build = configtools.build  # the training config builds through the same function

__all__ = ["ModelConfig", "apply_overrides", "FORMAT_VERSION"]
