"""`resolve_device(name, option)`: 'auto' | 'cpu' | 'cuda[:N]' -> torch.device, with one-line
user errors for unknown names and for CUDA on a machine without it."""

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
