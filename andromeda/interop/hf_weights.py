"""Tensor names and layouts between Hugging Face Llama-family checkpoints and andromeda.

- `SafetensorsFolder(folder)`: a lazy read-only mapping name -> tensor over `model.safetensors`
  or the shards listed in `model.safetensors.index.json` (never pickle: a folder holding only
  `pytorch_model.bin` is refused with a message that says how to re-save it).
- `weight_layout(cfg, o_proj_bias)`: which Hugging Face tensors make each andromeda tensor.
  Andromeda fuses q/k/v into one `wqkv` (rows [q; k; v]) and gate/up into one `w_in`
  (rows [gate; up]), so a `Piece` lists the source tensors in row order with their row counts.
- `state_from_hf(tensors, cfg, ...)`: build an andromeda state dict, checking every shape
  against the config and naming the tensor that does not fit.
- `state_to_hf(state, cfg)`: the inverse, splitting the fused rows again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from andromeda.errors import UserError
from andromeda.model.config import ModelConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers that older transformers versions saved with the weights; they are recomputed here.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class SafetensorsFolder(Mapping):
    """name -> tensor for the safetensors weights of a `save_pretrained` folder, read on access."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        if (folder / INDEX).exists():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{folder / INDEX} is not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE).exists():
            weight_map, files = None, [SINGLE]
        elif any(folder.glob("pytorch_model*.bin")):
            raise UserError(f"{folder} holds only pickle weights (pytorch_model.bin), which are never loaded here; "
                            "re-save them with transformers' save_pretrained(..., safe_serialization=True)")
        else:
            raise UserError(f"{folder} has no weights: expected {SINGLE} or {INDEX}")
        self._handles = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise UserError(f"weight shard missing: {path}")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for corrupt headers
                raise UserError(f"cannot read {path}: {e}") from None
        if weight_map is None:
            weight_map = {key: SINGLE for key in self._handles[SINGLE].keys()}  # noqa: SIM118 (not a dict)
        self._where = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def dtype(self) -> Optional[torch.dtype]:
        """The dtype of the first floating-point tensor (what the checkpoint was saved in)."""
        for name, file in self._where.items():
            sl = self._handles[file].get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class Piece:
    """Andromeda tensor `ours` is the row-wise concatenation of `theirs` (rows `rows[i]` each).
    A source named None is zeros: a bias andromeda has and the Hugging Face model lacks."""

    ours: str
    theirs: tuple[Optional[str], ...]
    rows: tuple[int, ...]


def weight_layout(cfg: ModelConfig, o_proj_bias: bool = True) -> list[Piece]:
    """Every andromeda parameter of a Llama-shaped config and the Hugging Face tensors behind it.
    `o_proj_bias=False` is Qwen2: bias on q/k/v but none on the output projection."""
    a, hd, hidden = cfg.attention, cfg.head_dim, cfg.mlp.resolved_hidden(cfg.dim)
    q, kv = a.heads * hd, a.kv_heads * hd
    pieces = [Piece("embed.weight", ("model.embed_tokens.weight",), (cfg.vocab_size,))]
    for i in range(cfg.depth):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        suffixes = ("weight", "bias") if a.bias else ("weight",)
        for s in suffixes:
            pieces.append(Piece(f"{ours}mixer.wqkv.{s}", tuple(f"{attn}{p}_proj.{s}" for p in "qkv"), (q, kv, kv)))
            o_name = f"{attn}o_proj.{s}" if s == "weight" or o_proj_bias else None
            pieces.append(Piece(f"{ours}mixer.wo.{s}", (o_name,), (cfg.dim,)))
        pieces.append(Piece(f"{ours}mixer_norm.weight", (hf + "input_layernorm.weight",), (cfg.dim,)))
        for s in ("weight", "bias") if cfg.mlp.bias else ("weight",):
            gate_up = (f"{mlp}gate_proj.{s}", f"{mlp}up_proj.{s}")
            pieces.append(Piece(f"{ours}ffn.w_in.{s}", gate_up, (hidden, hidden)))
            pieces.append(Piece(f"{ours}ffn.w_out.{s}", (f"{mlp}down_proj.{s}",), (cfg.dim,)))
        pieces.append(Piece(f"{ours}ffn_norm.weight", (hf + "post_attention_layernorm.weight",), (cfg.dim,)))
    pieces.append(Piece("norm.weight", ("model.norm.weight",), (cfg.dim,)))
    if not cfg.tie_embeddings:
        pieces.append(Piece("head.weight", ("lm_head.weight",), (cfg.vocab_size,)))
    return pieces


def state_from_hf(tensors: Mapping, cfg: ModelConfig, expected: dict[str, torch.Size], source: str,
                  o_proj_bias: bool = True, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Andromeda state dict from Hugging Face tensors; `expected` holds the andromeda shapes
    (from a model built on the meta device). Raises UserError naming any missing, extra or
    mis-shaped tensor."""
    layout = weight_layout(cfg, o_proj_bias)
    wanted = {name for piece in layout for name in piece.theirs if name is not None}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise UserError(f"{source} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in set(tensors) - wanted - ignorable if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise UserError(f"{source} has {len(extra)} tensor(s) this architecture does not use, e.g. {extra[0]} "
                        "(a feature andromeda cannot import)")
    state = {}
    for piece in layout:
        shape = tuple(expected[piece.ours])
        parts = []
        for name, rows in zip(piece.theirs, piece.rows):
            want = (rows, *shape[1:])
            if name is None:
                parts.append(torch.zeros(want, dtype=dtype or torch.float32))
                continue
            t = tensors[name]
            if tuple(t.shape) != want:
                raise UserError(f"{source}: {name} has shape {tuple(t.shape)} but config.json implies {want}")
            parts.append(t.to(dtype) if dtype is not None else t)
        state[piece.ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return state


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors from an andromeda state dict of a Llama-shaped config."""
    out = {}
    for piece in weight_layout(cfg):
        for name, t in zip(piece.theirs, state[piece.ours].split(list(piece.rows), dim=0)):
            out[name] = t.contiguous()
    return out
