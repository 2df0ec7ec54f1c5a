"""Training FLOPs per token and model FLOPs utilisation (MFU).

Offers `flops_per_token(model, seq_len)`, `device_peak_flops(device, dtype)` and `mfu(...)`.

Formula (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B), per token of a
training step (forward + backward = 3x forward):

    6 * N  +  12 * n_attn * H * d_head * T_eff

- N: parameters a token actually multiplies: active parameters (experts a token is not routed
  to are left out) minus lookup tables (token and learned position embeddings, which cost no
  matmul), plus the output head even when it is tied to the embedding.
- the second term is the q.k^T and p.v matmuls: 2 * 2 * H * d_head * T_eff per token forward,
  times 3. T_eff is the sequence length, or the sliding window when it is shorter. Like
  PaLM and nanoGPT we count the full T x T score matrix, not the causal half, so MFU figures
  compare with theirs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from andromeda.model.transformer import count_parameters

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


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    from andromeda.model.attention import Attention
    return [m for m in model.modules() if isinstance(m, Attention)]


def matmul_params(model: nn.Module) -> int:
    """N of the formula: active parameters less lookup tables, plus the head's matmul."""
    _, active = count_parameters(model)
    lookups = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = getattr(model, "head", None)
    tied = head is not None and getattr(model, "embed", None) is not None and head.weight is model.embed.weight
    return active - lookups + (head.weight.numel() if tied else 0)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len`."""
    attn = 0
    for layer in _attention_layers(model):
        span = min(seq_len, layer.window) if layer.window else seq_len
        attn += 12 * layer.heads * layer.head_dim * span
    return 6.0 * matmul_params(model) + attn


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
