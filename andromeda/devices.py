"""Device and dtype names from the command line.

- `resolve_device(name, option)`: 'auto' | 'cpu' | 'cuda[:N]' -> torch.device, with one-line
  user errors for unknown names and for CUDA on a machine without it.
- `resolve_dtype(name, device)`: 'auto' (bfloat16 on GPU, float32 on CPU) or a name in `DTYPES`.
"""

from __future__ import annotations

import torch

from andromeda.errors import UserError


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}={name!r} but CUDA is not available; use cpu")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
