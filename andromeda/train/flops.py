"""Training FLOPs per token and model FLOPs utilisation (MFU).

Offers `flops_per_token(model, seq_len)`, `device_peak_flops(device, dtype)` and `mfu(...)`.

Per token of a training step, forward + backward = 3x forward (Kaplan et al. 2020; PaLM,
Chowdhery et al. 2022, appendix B). The forward count is what each layer reports through the
layer contract (`flops_per_token`: 2 per multiply-add of its matrix products for the experts a
token reaches, attention scores over the full span as PaLM and nanoGPT count them, Mamba's scan;
Mixture-of-Depths blocks at their routed share), plus the output head and final norm. Lookup
tables (embeddings) cost no matmul. For a dense decoder this is nanoGPT's
6N + 12 * layers * H * d * T, N the parameters less the embeddings (the head counted even when tied).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# Dense (no sparsity) peak throughput per GPU from the vendors' data sheets:
# (name fragment as torch.cuda.get_device_name reports it, bf16 FLOP/s, tf32 FLOP/s).
# More specific names come first.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),  # SXM / HBM3
    ("H800", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
]


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len`."""
    forward = sum(block.flops_per_token(seq_len) for block in model.layers)
    forward += 2.0 * (model.head.weight.numel() + sum(p.numel() for p in model.norm.parameters()))
    return 3.0 * forward


def device_peak_flops(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[float]:
    """Peak FLOP/s of `device` for the matmul dtype (bf16, or TF32 for fp32), or None when
    unknown (CPUs, GPUs not in the table), in which case MFU is not reported."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, bf16, tf32 in PEAK_FLOPS:
        if fragment in name:
            return bf16 if dtype in (torch.bfloat16, torch.float16) else tf32
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: Optional[float]) -> Optional[float]:
    """Achieved / peak FLOP/s, as a fraction; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / peak
