"""Hugging Face interop: `save_pretrained` folders of Llama, Mistral and Qwen2 <-> andromeda.

- `config_from_hf(hf) -> (ModelConfig, o_proj_bias)`: map a transformers `config.json` dict
  (both the 4.x `rope_scaling` and the 5.x `rope_parameters` spellings) to a ModelConfig;
  anything andromeda would compute differently raises UserError naming the field.
- `config_to_hf(cfg) -> dict`: the inverse for Llama-compatible configs (Mistral when a
  sliding window is set).
- `tokenizer_from_hf(folder, hf)`: `tokenizer.json` as an `HFTokenizer`, with end/begin of
  text tokens from tokenizer_config.json, generation_config.json or config.json.
- `import_hf(folder, dtype)` -> `HFImport(model, tokenizer, info)`: a ready model.
- `export_hf(model, tokenizer, folder)`: write a folder that `from_pretrained` loads.

The math matches transformers' modeling_llama.py: RMSNorm (pre-norm), rotate-half RoPE,
SwiGLU MLP, softmax(q k^T / sqrt(head_dim)); Mistral's window lets query i see keys
i-window+1..i, exactly andromeda's `attention.window`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from andromeda.checkpoint import atomic_folder_write
from andromeda.data.tokenizer import HFTokenizer, Tokenizer
from andromeda.errors import UserError
from andromeda.interop.hf_weights import SafetensorsFolder, state_from_hf, state_to_hf
from andromeda.jsonfile import read_json
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer, build_model

# architecture -> model_type; the three share one decoder and differ in the options read below.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}  # transformers' "gelu" is the exact erf GELU
_REQUIRED = object()


def _field(hf: dict, key: str, default=_REQUIRED, where: str = ""):
    value = hf.get(key, default)
    if value is _REQUIRED or (value is None and default is _REQUIRED):
        raise UserError(f"config.json: missing field {where + '.' if where else ''}{key}")
    return value


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not archs:  # a config saved on its own has no architectures; model_type still tells
        by_type = {t: a for a, t in ARCHITECTURES.items()}
        archs = [by_type.get(hf.get("model_type"), f"model_type={hf.get('model_type')!r}")]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UserError(f"config.json: architectures={archs} is not supported; "
                        f"andromeda imports {', '.join(ARCHITECTURES)}")
    return archs[0]


def _rope_from_hf(hf: dict) -> dict:
    """position sub-config from rope_theta and rope_scaling / rope_parameters."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        # Llama-family modules rotate the whole head whatever this says, so importing it would
        # not reproduce the model.
        raise UserError(f"config.json: partial_rotary_factor={partial} is not supported for this architecture")
    pos = {"kind": "rope", "rope_theta": theta}
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if kind == "default":
        return pos
    if kind == "linear":
        return {**pos, "rope_scaling": "linear", "rope_factor": float(_field(params, "factor", where=field))}
    if kind == "llama3":
        return {**pos, "rope_scaling": "llama3", "rope_factor": float(_field(params, "factor", where=field)),
                "original_max_seq_len": int(original),
                "llama3_low_freq_factor": float(_field(params, "low_freq_factor", where=field)),
                "llama3_high_freq_factor": float(_field(params, "high_freq_factor", where=field))}
    if kind == "yarn":
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        # andromeda scales cos/sin by YaRN's default 0.1 ln(factor) + 1 (Peng et al. 2023, eq. 21)
        default_attn = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        attn = params.get("attention_factor")
        if attn is not None and not math.isclose(attn, default_attn, rel_tol=1e-9):
            raise UserError(f"config.json: {field}.attention_factor={attn} is not supported "
                            f"(andromeda uses the YaRN default {default_attn:.6g})")
        for key in ("mscale", "mscale_all_dim"):
            if params.get(key):
                raise UserError(f"config.json: {field}.{key} is not supported for yarn")
        if params.get("truncate", True) is False:
            raise UserError(f"config.json: {field}.truncate=false is not supported for yarn")
        return {**pos, "rope_scaling": "yarn", "rope_factor": float(factor), "original_max_seq_len": int(original),
                "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
                "yarn_beta_slow": float(params.get("beta_slow") or 1.0)}
    if kind == "dynamic":
        raise UserError(f"config.json: {field}.rope_type='dynamic' is not supported "
                        "(its frequencies change with the sequence length)")
    raise UserError(f"config.json: {field}.rope_type={kind!r} is not supported; "
                    "andromeda imports default, linear, llama3 and yarn")


def _window_from_hf(hf: dict, model_type: str, depth: int) -> Optional[int]:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        start = hf.get("max_window_layers", 0)
        types = hf.get("layer_types") or ["sliding_attention" if i >= start else "full_attention"
                                          for i in range(depth)]
        if len(set(types)) > 1:
            raise UserError("config.json: layer_types mixes sliding and full attention layers; "
                            "andromeda uses one attention window for every layer")
        return hf.get("sliding_window") if types[0] == "sliding_attention" else None
    return None


def config_from_hf(hf: dict) -> tuple[ModelConfig, bool]:
    """(ModelConfig, whether o_proj has a bias) for a transformers config dict."""
    model_type = ARCHITECTURES[architecture_of(hf)]
    dim, heads = int(_field(hf, "hidden_size")), int(_field(hf, "num_attention_heads"))
    depth = int(_field(hf, "num_hidden_layers"))
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise UserError(f"config.json: hidden_act={act!r} is not supported; choose one of {', '.join(_ACTIVATIONS)}")
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False  # Qwen2 biases q/k/v but not the output projection
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim") or dim // heads
    try:
        cfg = ModelConfig(
            vocab_size=int(_field(hf, "vocab_size")), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            dim=dim, depth=depth, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            attention=dict(heads=heads, kv_heads=int(hf.get("num_key_value_heads") or heads),
                           head_dim=int(head_dim), bias=qkv_bias,
                           dropout=float(hf.get("attention_dropout", 0.0)),
                           window=_window_from_hf(hf, model_type, depth)),
            position=_rope_from_hf(hf),
            norm=dict(kind="rms", placement="pre", eps=float(hf.get("rms_norm_eps", 1e-6))),
            mlp=dict(kind=_ACTIVATIONS[act], hidden_dim=int(_field(hf, "intermediate_size")),
                     bias=bool(hf.get("mlp_bias", False))))
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError and keeps its message
        raise UserError(f"config.json: {e}") from None
    return cfg, o_bias


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise UserError(f"cannot export to a Hugging Face Llama/Mistral folder: {what}")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """transformers config dict (Llama, or Mistral with a sliding window) for a Llama-shaped cfg."""
    a, p = cfg.attention, cfg.position
    _require(p.kind == "rope", f"position.kind={p.kind!r} (needs 'rope')")
    _require(p.rope_scaling in ("none", "linear", "llama3", "yarn"), f"position.rope_scaling={p.rope_scaling!r}")
    _require(p.rope_dim in (None, cfg.head_dim), "position.rope_dim must cover the whole head")
    _require(p.alibi_heads == 0, "ALiBi heads")
    _require(cfg.norm.kind == "rms" and cfg.norm.placement == "pre", "needs norm.kind='rms', placement='pre'")
    _require(cfg.mlp.kind in ("swiglu", "geglu"), f"mlp.kind={cfg.mlp.kind!r}")
    _require(a.qk_norm == "none", "qk_norm")
    _require(not cfg.block.parallel and cfg.block.shift_tokens == 0, "parallel blocks or token shift")
    _require(not (cfg.head_bias or cfg.block.residual_gain or p.rotate_values),
             "head_bias, block.residual_gain or position.rotate_values")
    _require(all(getattr(cfg, f) is None for f in ("moe", "moa", "mamba", "mod"))
             and set(vars(cfg.linear).values()) == {"dense"},
             "MoE, MoA, Mamba, Mixture-of-Depths or BitNet layers")
    _require(a.window is None or not (a.bias or cfg.mlp.bias),
             "biases together with a sliding window (Mistral has none)")
    arch = "MistralForCausalLM" if a.window is not None else "LlamaForCausalLM"
    rope: dict = {"rope_type": "default"}
    if p.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": p.rope_factor}
    elif p.rope_scaling in ("llama3", "yarn"):
        original = p.original_max_seq_len or max(1, int(cfg.max_seq_len / p.rope_factor))
        rope = {"rope_type": p.rope_scaling, "factor": p.rope_factor, "original_max_position_embeddings": original}
        if p.rope_scaling == "llama3":
            rope.update(low_freq_factor=p.llama3_low_freq_factor, high_freq_factor=p.llama3_high_freq_factor)
        else:
            rope.update(beta_fast=p.yarn_beta_fast, beta_slow=p.yarn_beta_slow)
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {"architectures": [arch], "model_type": ARCHITECTURES[arch], "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.dim, "intermediate_size": cfg.mlp.resolved_hidden(cfg.dim),
          "num_hidden_layers": cfg.depth, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
          "head_dim": cfg.head_dim, "hidden_act": "silu" if cfg.mlp.kind == "swiglu" else "gelu",
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm.eps,
          "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
          "attention_dropout": a.dropout, "rope_theta": p.rope_theta,
          # Both spellings: transformers 4.x reads rope_scaling, 5.x rope_parameters.
          "rope_scaling": None if p.rope_scaling == "none" else rope,
          "rope_parameters": {**rope, "rope_theta": p.rope_theta},
          "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True}
    if arch == "MistralForCausalLM":
        hf["sliding_window"] = a.window
    else:
        hf.update(attention_bias=a.bias, mlp_bias=cfg.mlp.bias)
    return hf


# ---------------------------------------------------------------- tokenizer
def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the optional file is absent."""
    return read_json(path) if path.exists() else {}


def _special_token(tok, name: str, sources: list[dict]) -> Optional[str]:
    """`name` ('eos' or 'bos') as a token string: tokenizer_config.json names the token
    (a string or an AddedToken dict); generation_config.json and config.json give ids."""
    for src in sources:
        token = src.get(f"{name}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return token
        ids = src.get(f"{name}_token_id")
        ids = ids if isinstance(ids, list) else [ids]
        for i in ids:
            if isinstance(i, int) and tok.id_to_token(i) is not None:
                return tok.id_to_token(i)
    return None


def tokenizer_from_hf(folder: Path, hf: dict) -> HFTokenizer:
    folder = Path(folder)
    path = folder / HFTokenizer.FILE
    if not path.exists():
        has_sp = (folder / "tokenizer.model").exists()
        hint = " (a sentencepiece tokenizer.model alone is not supported)" if has_sp else ""
        raise UserError(f"{folder} has no tokenizer.json{hint}; pass --no-tokenizer to convert the weights only")
    tok = HFTokenizer.from_file(path)
    sources = [_read_json(folder / "tokenizer_config.json"), _read_json(folder / "generation_config.json"), hf]
    return HFTokenizer(tok.tok, _special_token(tok.tok, "eos", sources), _special_token(tok.tok, "bos", sources))


# ---------------------------------------------------------------- folders
@dataclass
class HFImport:
    model: Transformer
    tokenizer: Optional[HFTokenizer]
    info: dict  # architecture, dtype, parameter count, tokenizer summary


def read_hf_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Hugging Face folder not found: {folder}")
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json (expected a save_pretrained folder)")
    return _read_json(folder / "config.json")


def _resolve_dtype(hf: dict, tensors: SafetensorsFolder, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The requested dtype, else the one the weights are stored in, else float32."""
    if dtype is not None:
        return dtype
    stored = tensors.dtype()
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def model_from_hf_state(hf: dict, tensors, dtype: torch.dtype = torch.float32, source: str = "weights") -> Transformer:
    """Build an andromeda model from a transformers config dict and a name -> tensor mapping."""
    cfg, o_bias = config_from_hf(hf)
    model = build_model(cfg, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = state_from_hf(tensors, cfg, expected, source, o_proj_bias=o_bias, dtype=dtype)
    # assign=True adopts the converted tensors instead of copying them into fresh storage.
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    model.reset_derived_buffers()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise UserError(f"{source}: no value for {leftover[0]}")
    return model.eval()


def import_hf(folder: Path, dtype: Optional[torch.dtype] = None, with_tokenizer: bool = True) -> HFImport:
    """Read a `save_pretrained` folder (config.json, safetensors, tokenizer.json)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    arch = architecture_of(hf)
    config_from_hf(hf)  # refuse an unsupported config before touching the weights
    tokenizer = tokenizer_from_hf(folder, hf) if with_tokenizer else None
    tensors = SafetensorsFolder(folder)
    dtype = _resolve_dtype(hf, tensors, dtype)
    model = model_from_hf_state(hf, tensors, dtype, source=str(folder))
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json vocab_size is "
                        f"{model.cfg.vocab_size}")
    info = {"architecture": arch, "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": None if tokenizer is None else
            {"vocab_size": tokenizer.vocab_size, "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
             "add_bos": tokenizer.add_bos}}
    return HFImport(model, tokenizer, info)


def export_hf(model: Transformer, tokenizer: Optional[Tokenizer], out: Path, dtype: Optional[torch.dtype] = None,
              overwrite: bool = False) -> dict:
    """Write `out` atomically as a transformers folder; returns a summary dict."""
    p = next(model.parameters())
    dtype = dtype or p.dtype
    hf = config_to_hf(model.cfg, dtype)
    tensors = {k: v.to(dtype) for k, v in state_to_hf(model.state_dict(), model.cfg).items()}
    hf_tok = tokenizer if isinstance(tokenizer, HFTokenizer) else None
    special = {}
    if hf_tok is not None:
        special = {"eos_token_id": hf_tok.eos_id, "bos_token_id": hf_tok.bos_id}
    hf.update(special)

    def fill(folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hf, indent=2))
        (folder / "generation_config.json").write_text(json.dumps({**special, "_from_model_config": True}, indent=2))
        if hf_tok is not None:
            hf_tok.save(folder)
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": hf_tok.eos_token,
                       "bos_token": hf_tok.bos_token, "model_max_length": model.cfg.max_seq_len}
            (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))

    atomic_folder_write(Path(out), fill, overwrite=overwrite)
    return {"architecture": hf["architectures"][0], "dtype": hf["dtype"], "out": str(out),
            "tokenizer": hf_tok is not None}
