"""BitNet b1.58 linear layers (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language
Models are in 1.58 Bits"; Wang et al. 2023, "BitNet").

Offers:
- `quantize_weight(w)`: ternary weights {-1, 0, +1} times one absmean scale per matrix
  (per expert for stacked 3-D expert weights), with a straight-through estimator.
- `quantize_activation(x)`: RMS normalisation (no learned gain) then 8-bit absmax
  quantisation per token, with a straight-through estimator.
- `TernaryWeights`: mixin giving `ternary_weight(name)`, which reads either the latent float
  parameter (training) or its 2-bit packed form made by `andromeda.quant.bitpack`.
- `BitLinear`: drop-in `nn.Linear` registered as linear kind 'bitnet', so
  `extras['linear'] = {'mlp': 'bitnet', ...}` turns a family of projections ternary.

Why the norm: the paper (and BitNet before it) normalises the activations inside the layer
before absmax quantisation, so the 8-bit range is used evenly whatever the residual scale.
The norm carries no learned gain, so a BitLinear has exactly the parameters of a dense one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACT_LEVELS = 127.0  # signed 8-bit activations: [-127, 127]
EPS = 1e-5


def _ste(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward the quantized value, backward the identity (Bengio et al. 2013). Without
    autograd the quantized tensor is returned as is, so inference is bit-exact with the
    packed form."""
    if torch.is_grad_enabled() and latent.requires_grad:
        return latent + (quantized - latent).detach()
    return quantized


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Absmean scale over the last two dims (one per matrix; one per expert for (E, i, o))."""
    return w.detach().abs().mean(dim=(-2, -1), keepdim=True).float().clamp(min=EPS)


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary codes in {-1, 0, 1} as int8, scale) with w ~= codes * scale (paper eq. 1-3)."""
    scale = weight_scale(w)
    codes = (w.detach().float() / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    codes, scale = ternarize(w)
    return _ste(w, (codes.float() * scale).to(w.dtype))


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm, then per-token absmax quantisation to 8 bits."""
    x = F.rms_norm(x, (x.shape[-1],), None, EPS)
    scale = ACT_LEVELS / x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=EPS)
    q = ((x.detach().float() * scale).round().clamp(-ACT_LEVELS, ACT_LEVELS) / scale).to(x.dtype)
    return _ste(x, q)


class TernaryWeights:
    """Mixin for modules whose parameters named in `ternary_params` are ternary at forward.

    After `andromeda.quant.bitpack.pack_module`, a parameter `w` is replaced by buffers
    `w_packed` (uint8, four codes a byte) and `w_scale`, and `ternary_weight('w')` unpacks.
    """

    ternary_params: tuple[str, ...] = ()

    def ternary_weight(self, name: str) -> torch.Tensor:
        packed = getattr(self, name + "_packed", None)
        if packed is None:
            return quantize_weight(getattr(self, name))
        from andromeda.quant.bitpack import unpack_ternary

        shape = self._packed_shapes[name]
        scale = getattr(self, name + "_scale")  # kept in the model's dtype by .to()
        return (unpack_ternary(packed, shape).float() * scale.float()).to(scale.dtype)


class BitLinear(nn.Linear, TernaryWeights):
    """y = Q_w(W) Q_x(norm(x)) + b with ternary Q_w and 8-bit Q_x (BitNet b1.58)."""

    ternary_params = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ternary_weight("weight")
        return F.linear(quantize_activation(x), w.to(x.dtype), self.bias)

