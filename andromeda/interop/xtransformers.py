"""Import models saved from x-transformers 1.16, the library the Andromeda spec defines its model with.

Offers:
- `config_from_xtransformers(args) -> ModelConfig`: the `TransformerWrapper` constructor arguments
  (with `attn_layers` holding the `Decoder`'s) as a ModelConfig that computes what x-transformers
  1.16.0 computes; any argument whose effect this model does not reproduce is refused by name.
- `xtransformers_layout(args) -> Layout`: every x-transformers tensor with its expected shape,
  and the rows of it that make each andromeda tensor.
- `state_from_xtransformers(tensors, args, source)`: an andromeda state dict, each shape checked.
- `read_state_dict(path)` (torch.load with weights_only=True) and `import_xtransformers(pt, json)`.

What x-transformers 1.16 computes, and the option that reproduces it (docs/interop.md has the table):
LayerNorms with bias (`norm.bias`); FFN Linear(dim, int(dim * ff_mult)) with bias, GELU or SiLU
(`mlp.kind`, `mlp.hidden_dim`, `mlp.bias`), and for ff_glu a projection whose rows are
[value; gate] (andromeda's `w_in` is [gate; value], so the halves swap); a logits bias
(`head_bias`); under deepnorm, post-norm with the skip multiplied by a learned vector and by
(2 depth)^(1/4) (`norm.placement='deepnorm'`, `block.residual_gain`); rotary on the first
max(rotary_emb_dim or dim_head // 2, 32) channels (`position.rope_dim`), applied to values too
with the keys' xPos factor (`position.rotate_values`) centred on the middle of each call, which
for values does not cancel: the import fixes that centre at max_seq_len // 2, x-transformers'
own on calls of max_seq_len tokens, so the model is causal and decodes with a cache
(`position.xpos_value_centre='call'` reproduces every call, uncached); ALiBi with Press et al.'s slopes for
alibi_num_heads on the first heads (`position.alibi_heads`); token shift of dim // (n + 1)
channel groups (`block.shift_tokens`); one shared key/value head (`attention.kv_heads=1`);
cosine-similarity QK-norm (`attention.qk_norm='l2'`), whose flash path scales scores by
1 / (dim_head * attn_qk_norm_scale) instead of attn_qk_norm_scale (`attention.qk_norm_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from andromeda.errors import UserError
from andromeda.jsonfile import read_json
from andromeda.model.config import ModelConfig
from andromeda.model.position import Rotary
from andromeda.model.transformer import Transformer, build_model

VERSION = "1.16.0"
DIM_HEAD = 64  # x-transformers' DEFAULT_DIM_HEAD

# Arguments read into the config (the others below must keep x-transformers' default).
WRAPPER_ARGS = {"num_tokens", "max_seq_len", "attn_layers", "use_abs_pos_emb", "emb_dropout", "tie_embedding",
                "emb_dim", "logits_dim", "num_memory_tokens"}
DECODER_ARGS = {"dim", "depth", "heads", "alibi_pos_bias", "alibi_num_heads", "rotary_pos_emb", "rotary_xpos",
                "rotary_emb_dim", "rotary_xpos_scale_base", "deepnorm", "shift_tokens", "pre_norm", "use_rmsnorm",
                "scale_residual", "attn_dim_head", "attn_one_kv_head", "attn_flash", "attn_dropout", "attn_qk_norm",
                "attn_qk_norm_dim_scale", "attn_qk_norm_scale", "attn_qk_norm_groups", "ff_mult", "ff_glu",
                "ff_swish", "ff_no_bias", "ff_dropout"}
# Initialisation only: no effect on the function of weights that are imported.
INIT_ONLY = {"zero_init_branch_output", "attn_zero_init_output", "ff_zero_init_output"}
# Accepted at x-transformers' default value only; anything else changes the function.
WRAPPER_DEFAULTS = {"max_mem_len": 0.0, "shift_mem_down": 0, "post_emb_norm": False, "l2norm_embed": False,
                    "scaled_sinu_pos_emb": False, "emb_frac_gradient": 1.0}
DECODER_DEFAULTS = {
    "use_scalenorm": False, "alibi_learned": False, "rel_pos_bias": False, "dynamic_pos_bias": False,
    "custom_layers": None, "sandwich_coef": None, "par_ratio": None, "residual_attn": False,
    "cross_residual_attn": False, "macaron": False, "gate_residual": False, "scale_residual_constant": 1.0,
    "sandwich_norm": False, "resi_dual": False, "layer_dropout": 0.0, "cross_attn_tokens_dropout": 0.0,
    "cross_attend": False, "only_cross": False, "pre_norm_has_final_norm": True,
    "attn_talking_heads": False, "attn_head_scale": False, "attn_sparse_topk": None, "attn_num_mem_kv": 0,
    "attn_on_attn": False, "attn_gate_values": False, "attn_max_attend_past": None, "attn_shared_kv": False,
    "attn_value_dim_head": None, "attn_tensor_product": False, "ff_relu_squared": False, "ff_post_act_ln": False,
}
# Arguments of later x-transformers releases that Andromeda configs use, and what 1.16.0 does with them.
LATER = {"attn_kv_heads": "1.16.0 raises on it, so no 1.16 model has it",
         "use_simple_rmsnorm": "1.16.0 ignores it and builds LayerNorms; for a model built with 1.16, drop it "
                               "from the JSON"}


def _refuse(name: str, value: Any, why: str) -> None:
    raise UserError(f"x-transformers argument {name}={value!r} is not supported: {why}")


def _check_names(args: dict, known: set, defaults: dict, where: str) -> None:
    for name, value in args.items():
        if name in known or name in INIT_ONLY:
            continue
        if name in defaults:
            if value != defaults[name]:
                _refuse(name, value, f"andromeda imports only its default ({defaults[name]!r})")
            continue
        if name in LATER:
            raise UserError(f"x-transformers argument {name!r} is not an argument of x-transformers {VERSION}, "
                            f"the version this importer reads ({LATER[name]})")
        hint = next((f"; did you mean {p}{name}?" for p in ("attn_", "ff_") if p + name in known), "")
        raise UserError(f"unknown x-transformers {where} argument {name!r} (x-transformers {VERSION}){hint}")


def _get(args: dict, name: str, default: Any, kind: type) -> Any:
    value = args.get(name, default)
    if value is None or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
        return value if value is None else float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"x-transformers argument {name}={value!r} must be {kind.__name__}")
    return value


@dataclass(frozen=True)
class Derived:
    """Facts of an x-transformers configuration that both the config and the tensor layout need."""

    dim: int
    depth: int
    heads: int
    dim_head: int
    kv_heads: int
    hidden: int
    glu: bool
    ff_bias: bool
    shift: bool
    pre_norm: bool
    rms: bool
    residual_gain: bool
    qk_scale: bool
    rotary_dim: Optional[int]


def derive(args: dict) -> Derived:
    """Read and check the arguments (refusing unsupported ones by name)."""
    if not isinstance(args, dict):
        raise UserError("the x-transformers config must be a JSON object of TransformerWrapper arguments")
    layers = args.get("attn_layers")
    if not isinstance(layers, dict):
        raise UserError("the x-transformers config needs attn_layers: an object of the Decoder's arguments")
    _check_names(args, WRAPPER_ARGS, WRAPPER_DEFAULTS, "TransformerWrapper")
    _check_names(layers, DECODER_ARGS, DECODER_DEFAULTS, "Decoder")
    for name in ("num_tokens", "max_seq_len"):
        if name not in args:
            raise UserError(f"the x-transformers config lacks TransformerWrapper's {name}")
    for name in ("dim", "depth"):
        if name not in layers:
            raise UserError(f"the x-transformers config lacks the Decoder's {name}")
    dim, depth, heads = _get(layers, "dim", None, int), _get(layers, "depth", None, int), _get(layers, "heads", 8, int)
    dim_head = _get(layers, "attn_dim_head", DIM_HEAD, int)
    vocab = _get(args, "num_tokens", None, int)
    for name, ok_value in (("emb_dim", dim), ("logits_dim", vocab)):
        if args.get(name) not in (None, ok_value):
            _refuse(name, args[name], f"andromeda's embedding and head are {ok_value} wide")
    if _get(args, "tie_embedding", False, bool):
        _refuse("tie_embedding", True, f"x-transformers {VERSION}'s tied head reads token_emb.weight, which its "
                "TokenEmbedding lacks, so such a model cannot run there")
    if args.get("num_memory_tokens") not in (None, 0):
        _refuse("num_memory_tokens", args["num_memory_tokens"], "memory tokens are not part of andromeda's model")
    rotary = bool(layers.get("rotary_pos_emb", False) or layers.get("rotary_xpos", False))
    if _get(args, "use_abs_pos_emb", True, bool) and not rotary:
        _refuse("use_abs_pos_emb", True, "x-transformers' absolute embedding is scaled by dim^-0.5 "
                "(set use_abs_pos_emb=false if the model was built so, or use rotary/xPos)")
    rotary_dim = None
    if rotary:
        rotary_dim = max(_get(layers, "rotary_emb_dim", None, int) or dim_head // 2, 32)
        if rotary_dim > dim_head or rotary_dim % 2:
            _refuse("rotary_emb_dim", layers.get("rotary_emb_dim"),
                    f"the rotary width max(rotary_emb_dim or dim_head // 2, 32) = {rotary_dim} must be even "
                    f"and fit in attn_dim_head ({dim_head}); x-transformers itself fails there")
    shift = _get(layers, "shift_tokens", 0, int)
    if shift < 0:
        _refuse("shift_tokens", shift, "it must be >= 0 (one value for every layer)")
    glu, no_bias = _get(layers, "ff_glu", False, bool), _get(layers, "ff_no_bias", False, bool)
    if glu and no_bias:
        _refuse("ff_no_bias", True, "with ff_glu x-transformers keeps the GLU input bias and drops the output "
                "one; andromeda's mlp.bias covers both projections")
    if _get(layers, "ff_dropout", 0.0, float):
        _refuse("ff_dropout", layers["ff_dropout"], "x-transformers drops the FFN's hidden units, andromeda's "
                "mlp.dropout its output; set it to 0 in the JSON to import the model for inference")
    if layers.get("attn_qk_norm") and _get(layers, "attn_qk_norm_groups", 1, int) != 1:
        _refuse("attn_qk_norm_groups", layers["attn_qk_norm_groups"], "QK-norm over head groups is not supported")
    deepnorm = _get(layers, "deepnorm", False, bool)
    return Derived(
        dim=dim, depth=depth, heads=heads, dim_head=dim_head,
        kv_heads=1 if _get(layers, "attn_one_kv_head", False, bool) else heads,
        hidden=int(dim * _get(layers, "ff_mult", 4, float)), glu=glu, ff_bias=not no_bias, shift=shift > 0,
        pre_norm=_get(layers, "pre_norm", True, bool) and not deepnorm, rms=_get(layers, "use_rmsnorm", False, bool),
        residual_gain=deepnorm or _get(layers, "scale_residual", False, bool),
        qk_scale=bool(layers.get("attn_qk_norm")) and _get(layers, "attn_qk_norm_dim_scale", False, bool),
        rotary_dim=rotary_dim)


def config_from_xtransformers(args: dict) -> ModelConfig:
    """The ModelConfig of a TransformerWrapper(..., attn_layers=Decoder(...)) of x-transformers 1.16."""
    d = derive(args)
    layers = args["attn_layers"]
    max_seq_len = _get(args, "max_seq_len", None, int)
    position: dict = {"kind": "none"}
    if d.rotary_dim is not None:
        base = _get(layers, "rotary_xpos_scale_base", 512, float)
        position = {"kind": "xpos" if layers.get("rotary_xpos") else "rope", "rope_dim": d.rotary_dim,
                    "rotate_values": True, "xpos_scale_base": base,
                    # x-transformers does not clamp the xPos exponent: keep ours out of the way up to max_seq_len
                    "xpos_max_power": float(max(32, math.ceil(max_seq_len / (2 * base))))}
    if _get(layers, "alibi_pos_bias", False, bool):
        n = _get(layers, "alibi_num_heads", None, int)
        if n is not None and not 1 <= n <= d.heads:
            _refuse("alibi_num_heads", n, f"it must be between 1 and heads ({d.heads})")
        position["alibi_heads"] = d.heads if n is None else n
    attention: dict = {"heads": d.heads, "kv_heads": d.kv_heads, "head_dim": d.dim_head,
                       "dropout": _get(layers, "attn_dropout", 0.0, float)}
    if layers.get("attn_qk_norm"):
        scale = _get(layers, "attn_qk_norm_scale", 10, float)
        if layers.get("attn_flash"):  # 1.16's flash path multiplies q by dim_head^-0.5 / scale, then SDPA
            scale = 1.0 / (d.dim_head * scale)  # scales by dim_head^-0.5 again
        attention.update(qk_norm="l2", qk_norm_dim_scale=d.qk_scale, qk_norm_scale=scale)
    placement = "deepnorm" if layers.get("deepnorm") else ("pre" if d.pre_norm else "post")
    # x-transformers' RMSNorm divides by max(rms, 1e-8); F.rms_norm by sqrt(ms + eps): eps = 1e-16 matches
    norm = {"kind": "rms", "eps": 1e-16} if d.rms else {"kind": "layer", "eps": 1e-5, "bias": True}
    act = "silu" if layers.get("ff_swish") else "gelu"
    mlp = {"kind": ({"silu": "swiglu", "gelu": "geglu"}[act] if d.glu else act), "hidden_dim": d.hidden,
           "bias": d.ff_bias}
    try:
        return ModelConfig(
            vocab_size=_get(args, "num_tokens", None, int), max_seq_len=max_seq_len, dim=d.dim, depth=d.depth,
            head_bias=True, embed_dropout=_get(args, "emb_dropout", 0.0, float),
            attention=attention, position=position, norm={**norm, "placement": placement}, mlp=mlp,
            block={"shift_tokens": _get(layers, "shift_tokens", 0, int), "residual_gain": d.residual_gain})
    except (TypeError, ValueError) as e:  # ConfigError keeps its message
        raise UserError(f"x-transformers config: {e}") from None


@dataclass
class Layout:
    sources: dict  # x-transformers name -> expected shape
    pieces: list  # (andromeda name, [(x-transformers name, first row, rows)])
    buffers: dict  # x-transformers buffer name -> the tensor it must equal (andromeda recomputes it)


def xtransformers_layout(args: dict) -> Layout:
    """What the arguments make x-transformers 1.16 build, tensor by tensor."""
    d, cfg = derive(args), config_from_xtransformers(args)
    D, V, hd = d.dim, cfg.vocab_size, d.dim_head
    out = Layout({}, [], {})

    def take(ours: str, theirs: str, shape: tuple, rows: Optional[list] = None) -> None:
        out.sources[theirs] = shape
        out.pieces.append((ours, rows or [(theirs, 0, shape[0])]))

    def norm(ours: str, theirs: str) -> None:
        if d.rms:
            take(f"{ours}.weight", f"{theirs}.g", (D,))
        else:
            take(f"{ours}.weight", f"{theirs}.weight", (D,))
            take(f"{ours}.bias", f"{theirs}.bias", (D,))

    take("embed.weight", "token_emb.emb.weight", (V, D))
    for i in range(d.depth):
        a, f, ours = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}", f"layers.{i}"
        inner = ".1.fn." if d.shift else ".1."  # ShiftTokens wraps the sublayer as .fn
        q, kv = d.heads * hd, d.kv_heads * hd
        for name, rows in (("to_q", q), ("to_k", kv), ("to_v", kv)):
            out.sources[f"{a}{inner}{name}.weight"] = (rows, D)
        out.pieces.append((f"{ours}.mixer.wqkv.weight", [(f"{a}{inner}to_q.weight", 0, q),
                                                          (f"{a}{inner}to_k.weight", 0, kv),
                                                          (f"{a}{inner}to_v.weight", 0, kv)]))
        take(f"{ours}.mixer.wo.weight", f"{a}{inner}to_out.weight", (D, q))
        if d.qk_scale:
            take(f"{ours}.mixer.q_norm.weight", f"{a}{inner}qk_norm_q_scale", (hd,))
            take(f"{ours}.mixer.k_norm.weight", f"{a}{inner}qk_norm_k_scale", (hd,))
        slot = ".0.0" if d.pre_norm else ".0.2"  # norms: [pre-branch, post-branch, post-main]
        norm(f"{ours}.mixer_norm", a + slot)
        norm(f"{ours}.ffn_norm", f + slot)
        if d.residual_gain:
            take(f"{ours}.mixer_gain.weight", f"{a}.2.residual_scale", (D,))
            take(f"{ours}.ffn_gain.weight", f"{f}.2.residual_scale", (D,))
        h = d.hidden
        for s in ("weight", "bias") if d.ff_bias or d.glu else ("weight",):
            tail = (D,) if s == "weight" else ()
            if d.glu:  # GLU rows are [value; gate], andromeda's w_in [gate; value]
                src = f"{f}{inner}ff.0.proj.{s}"
                out.sources[src] = (2 * h, *tail)
                out.pieces.append((f"{ours}.ffn.w_in.{s}", [(src, h, h), (src, 0, h)]))
            else:
                take(f"{ours}.ffn.w_in.{s}", f"{f}{inner}ff.0.0.{s}", (h, *tail))
        for s in ("weight", "bias") if d.ff_bias else ("weight",):
            take(f"{ours}.ffn.w_out.{s}", f"{f}{inner}ff.3.{s}", (D, h) if s == "weight" else (D,))
    if d.pre_norm:
        norm("norm", "attn_layers.final_norm")
    take("head.weight", "to_logits.weight", (V, D))
    take("head.bias", "to_logits.bias", (V,))
    if d.rotary_dim is not None:  # persistent buffers in 1.16; andromeda recomputes them, so they must agree
        rotary = Rotary(cfg)
        out.buffers["attn_layers.rotary_pos_emb.inv_freq"] = rotary.inv_freq
        if rotary.xpos:
            out.buffers["attn_layers.rotary_pos_emb.scale"] = rotary.xpos_zeta[: d.rotary_dim // 2]
    return out


def _strip_prefix(tensors: Mapping, source: str) -> dict:
    """Keys as TransformerWrapper names them; a common prefix (AutoregressiveWrapper's 'net.') is removed."""
    anchor = "token_emb.emb.weight"
    prefixes = sorted({k[: -len(anchor)] for k in tensors if k.endswith(anchor)})
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p) for p in prefixes)
        raise UserError(f"{source}: expected one x-transformers TransformerWrapper state dict with {anchor}; "
                        f"found {found}")
    p = prefixes[0]
    outside = sorted(k for k in tensors if not k.startswith(p))
    if outside:
        raise UserError(f"{source}: tensor {outside[0]} is outside the model (prefix {p!r})")
    return {k[len(p):]: v for k, v in tensors.items()}


def state_from_xtransformers(tensors: Mapping, args: dict, source: str) -> dict:
    """Andromeda state dict from an x-transformers 1.16 state dict and its arguments; UserError
    names any missing, extra or mis-shaped tensor."""
    layout = xtransformers_layout(args)
    tensors = _strip_prefix(tensors, source)
    wanted = set(layout.sources) | set(layout.buffers)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise UserError(f"{source} lacks {len(missing)} tensor(s) the arguments imply, e.g. {missing[0]}")
    extra = sorted(set(tensors) - wanted)
    if extra:
        raise UserError(f"{source} has {len(extra)} tensor(s) the arguments do not explain, e.g. {extra[0]}")
    shapes = {**layout.sources, **{name: tuple(t.shape) for name, t in layout.buffers.items()}}
    for name, want in shapes.items():
        if tuple(tensors[name].shape) != want:
            raise UserError(f"{source}: {name} has shape {tuple(tensors[name].shape)} but the arguments imply {want}")
    for name, ours in layout.buffers.items():
        if not torch.allclose(tensors[name].float(), ours, rtol=1e-3, atol=0):
            raise UserError(f"{source}: {name} differs from x-transformers {VERSION}'s rotary tables for these "
                            "arguments (a modified model cannot be imported)")
    return {ours: torch.cat([tensors[n][first:first + rows] for n, first, rows in parts], dim=0)
            for ours, parts in layout.pieces}


def read_state_dict(path: Path) -> dict:
    """A state dict saved with torch.save, loaded with weights_only=True (no arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"x-transformers checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors differ by version; the message says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} with weights_only=True: {first}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict (a mapping of names to tensors); save model.state_dict()")
    return dict(state)


def import_xtransformers(weights: Path, config: Path, dtype: Optional[torch.dtype] = None) -> Transformer:
    """A ready model (eval mode) from a saved x-transformers state dict and its arguments as JSON."""
    from andromeda.checkpoint import load_weights

    args = read_json(Path(config), "x-transformers config")
    cfg = config_from_xtransformers(args)
    state = state_from_xtransformers(read_state_dict(weights), args, str(weights))
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    model = build_model(cfg, device="meta").to(dtype or max(set(floats), key=floats.count))
    load_weights(model, state, str(weights))
    return model.eval()
