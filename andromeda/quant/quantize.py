"""Quantise a built model in place, and save / load quantised checkpoints.

Offers:
- `quantize_model(model, bits, group_size=32, head="int8", embedding="int8") -> dict`: replace
  every plain `nn.Linear` by `Int8Linear` (bits 8) or `Int4Linear` (bits 4), the head by the
  `head` choice and the token embedding by the `embedding` choice ('int8' or 'float'); returns
  the scheme recorded in the checkpoint config. BitNet layers (already ternary), MoE expert
  tensors and norms stay as they are.
- `is_quantized(model)`, `scheme_of(config)`: whether a model / checkpoint config is quantised.
- `save_quantized(dest, model, tokenizer, scheme, meta, overwrite)`: an atomic checkpoint
  folder (`model.safetensors` with codes and scales, `config.json` with a `quantization` entry).
- `load_quantized(folder, config, device, dtype)`: the model rebuilt from the tensor names in
  the file (which modules are int8 / int4 / float), used by `andromeda.checkpoint.load_checkpoint`,
  so every command that loads a checkpoint loads a quantised one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from andromeda.errors import UserError
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer, build_model
from andromeda.quant.weight_only import GROUP_SIZES, SCHEMES, Int4Linear, Int8Embedding, Int8Linear

QUANT_KEY = "quantization"  # entry of config.json that marks a quantised checkpoint
_QUANT_TYPES = (Int8Linear, Int4Linear, Int8Embedding)


def _plain_linears(model: nn.Module):
    """(parent, attribute, module) of every exact nn.Linear (not BitLinear or other subclasses,
    apart from the decode-layout RowLinear, which holds the same state)."""
    from andromeda.infer.cpu_linears import RowLinear

    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child) in (nn.Linear, RowLinear):
                yield parent, attr, child


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _QUANT_TYPES) for m in model.modules())


def scheme_of(config: dict) -> Optional[dict]:
    """The `quantization` entry of a checkpoint config, or None for a float checkpoint."""
    return config.get(QUANT_KEY)


def check_scheme(bits: int, group_size: Optional[int]) -> None:
    if bits not in SCHEMES:
        raise UserError(f"--bits must be 8 or 4, got {bits}")
    if bits == 8 and group_size is not None:
        raise UserError("--group-size applies to --bits 4 only (int8 has one scale per output channel)")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


@torch.no_grad()
def quantize_model(model: Transformer, bits: int, group_size: Optional[int] = 32, head: str = "int8",
                   embedding: str = "int8") -> dict:
    """Quantise `model` in place (float weights in, codes and scales out); returns the scheme."""
    group_size = group_size if bits == 4 else None
    check_scheme(bits, group_size)
    if is_quantized(model):
        raise UserError("the model is already quantised")
    if head not in ("int8", "int4", "float") or embedding not in ("int8", "float"):
        raise UserError(f"head must be int8, int4 or float and embedding int8 or float, got {head!r}, {embedding!r}")
    tied = model.cfg.tie_embeddings
    if tied and head != embedding:
        raise UserError(f"a model with tied embeddings keeps one matrix for embedding and head; got head={head!r}, "
                        f"embedding={embedding!r}")
    head_module = model.head
    for parent, attr, lin in list(_plain_linears(model)):
        kind = head if lin is head_module else SCHEMES[bits]
        if kind == "int4" and lin.in_features % group_size:
            kind = "int8"  # a width the groups do not divide: per-channel int8 instead
        if kind == "float":
            continue
        new = Int4Linear.from_linear(lin, group_size) if kind == "int4" else Int8Linear.from_linear(lin)
        setattr(parent, attr, new)
    if embedding == "int8":
        model.embed = Int8Embedding.from_embedding(model.embed)
        if tied and isinstance(model.head, Int8Linear):
            _tie(model)
    scheme = {"scheme": SCHEMES[bits], "bits": bits, "group_size": group_size, "head": head, "embedding": embedding}
    return scheme


def _tie(model: Transformer) -> None:
    """Make the int8 head read the int8 embedding's codes and scales (one matrix, as when float)."""
    model.head.weight_int8 = model.embed.weight_int8
    model.head.weight_scale = model.embed.weight_scale


def _state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        for name in ("head.weight", "head.weight_int8", "head.weight_scale"):
            state.pop(name, None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_quantized(dest: Path, model: Transformer, tokenizer, scheme: dict, meta: Optional[dict] = None,
                   overwrite: bool = False) -> Path:
    """Write the quantised model as a checkpoint folder, atomically."""
    from andromeda.checkpoint import CONFIG, WEIGHTS, atomic_folder_write, write_config_files

    def fill(folder: Path) -> None:
        save_file(_state_for_saving(model), str(folder / WEIGHTS), metadata={"format": "pt"})
        write_config_files(folder, model.cfg, tokenizer, meta)
        config = json.loads((folder / CONFIG).read_text())
        config[QUANT_KEY] = scheme
        (folder / CONFIG).write_text(json.dumps(config, indent=2))

    try:
        return atomic_folder_write(Path(dest), fill, overwrite=overwrite)
    except OSError as e:
        raise UserError(f"could not write checkpoint {dest}: {e.strerror or e}") from None


def _structure_from_state(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Swap modules of a meta-device model for the quantised kinds the file's tensor names say."""
    for parent, attr, lin in list(_plain_linears(model)):
        prefix = "" if parent is model else next(n for n, m in model.named_modules() if m is parent) + "."
        name = prefix + attr
        if f"{name}.weight_int4" in state:
            groups = state[f"{name}.weight_scale"].shape[-1]
            new = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None,
                             lin.in_features // max(groups, 1), device="meta")
        elif f"{name}.weight_int8" in state or (lin is model.head and "embed.weight_int8" in state
                                                 and model.cfg.tie_embeddings):
            new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        else:
            continue
        setattr(parent, attr, new)
    if "embed.weight_int8" in state:
        model.embed = Int8Embedding(model.embed.num_embeddings, model.embed.embedding_dim, device="meta")


def load_quantized(folder: Path, config: dict, device="cpu", dtype=None) -> Transformer:
    """The quantised model of a checkpoint folder, in eval mode (scales in `dtype`, default float32)."""
    from andromeda.checkpoint import WEIGHTS

    path = Path(folder) / WEIGHTS
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"cannot read {path}: {e}") from None
    model = build_model(ModelConfig.from_dict(config["model"]), device="meta")
    _structure_from_state(model, state)
    expected = _state_for_saving_names(model)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{path} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, config expects {tuple(shapes[name])}")
    model.to_empty(device=device)
    model.load_state_dict(state, strict=False)
    model = model.to(dtype or torch.float32)
    if model.cfg.tie_embeddings:
        if isinstance(model.head, Int8Linear):
            _tie(model)
        else:
            model.head.weight = model.embed.weight
    model.reset_derived_buffers()
    return model.eval()


def _state_for_saving_names(model: Transformer) -> set[str]:
    names = set(model.state_dict())
    if model.cfg.tie_embeddings:
        names -= {"head.weight", "head.weight_int8", "head.weight_scale"}
    return names
