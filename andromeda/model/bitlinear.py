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
  `linear.mlp = 'bitnet'` (and the other families of the `linear` section) turns a family
  of projections ternary.

Why the norm: the paper (and BitNet before it) normalises the activations inside the layer
before absmax quantisation, so the 8-bit range is used evenly whatever the residual scale.
The norm carries no learned gain, so a BitLinear has exactly the parameters of a dense one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.model.linear import compiled_few_rows

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


@torch.library.custom_op("andromeda::quantize_activation", mutates_args=())
def quantize_activation_opaque(x: torch.Tensor, interleave: int) -> torch.Tensor:
    """`quantize_activation` for inference, as an op the compiler cannot see into: inside a
    compiled one-row product, Inductor would otherwise inline the quantisation into the
    reduction and redo it for every output row. With interleave=4 the result is laid out
    (..., 4, in / 4), element [s, j] being feature 4j + s: the order in which a packed byte
    holds its four weights."""
    q = quantize_activation(x)
    if interleave == 1:
        return q
    return q.unflatten(-1, (-1, interleave)).transpose(-1, -2).contiguous()


@quantize_activation_opaque.register_fake
def _(x: torch.Tensor, interleave: int) -> torch.Tensor:
    if interleave == 1:
        return torch.empty_like(x)
    return x.new_empty(*x.shape[:-1], interleave, x.shape[-1] // interleave)


class TernaryWeights:
    """Mixin for modules whose parameters named in `ternary_params` are ternary at forward.

    After `andromeda.quant.bitpack.pack_module`, a parameter `w` is replaced by buffers
    `w_packed` (uint8, four codes a byte) and `w_scale`, and `ternary_weight('w')` unpacks.
    """

    ternary_params: tuple[str, ...] = ()

    def ternary_weight(self, name: str) -> torch.Tensor:
        """The dequantised ternary weight `name` (codes * scale) in the model's dtype.

        Training (autograd on): quantised at every call, with the straight-through gradient.
        Eager inference: quantised once and kept until the latent weight changes (any
        in-place update bumps its version); quantising a matrix costs several full passes
        and allocations, many times a one-row product. The price is one extra copy of the
        weight while inference runs; the next training forward drops it. Packed weights are
        dequantised at every call, so only their 2-bit form stays resident."""
        packed = getattr(self, name + "_packed", None)
        if packed is not None:
            from andromeda.quant.bitpack import unpack_dequantized

            # The scale buffer follows the model's dtype under .to(), so the weight comes out in it.
            return unpack_dequantized(packed, self._packed_shapes[name], getattr(self, name + "_scale"))
        latent = getattr(self, name)
        if torch.compiler.is_compiling():
            return quantize_weight(latent)
        cache = self.__dict__.setdefault("_inference_weights", {})
        if torch.is_grad_enabled():
            cache.clear()
            return quantize_weight(latent)
        key = (latent._version, latent.data_ptr(), latent.dtype, latent.device)
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, quantize_weight(latent))
        return cache[name][1]


class BitLinear(nn.Linear, TernaryWeights):
    """y = Q_w(W) Q_x(norm(x)) + b with ternary Q_w and 8-bit Q_x (BitNet b1.58)."""

    ternary_params = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled_few_rows(x) and not torch.is_grad_enabled():
            y = self._few_rows_product(x)
            if y is not None:
                return y if self.bias is None else y + self.bias
        return F.linear(quantize_activation(x), self.ternary_weight("weight").to(x.dtype), self.bias)

    def _few_rows_product(self, x: torch.Tensor):
        """Small-batch decoding under torch.compile on CPU: (Q_x(x) . codes) * scale written as
        reductions that read the weight once, as int2 codes when packed (four to a byte, so
        the activations come de-interleaved to match) or as the latent floats, compared with
        the threshold scale / 2 (what rounding w / scale to {-1, 0, 1} amounts to). None when
        no such form applies (packed rows not a whole number of bytes)."""
        out_f, in_f = self.out_features, self.in_features
        packed = getattr(self, "weight_packed", None)
        if packed is None:
            w = self.weight.float()
            scale = w.abs().sum(-1).mean() / in_f  # = weight_scale(w): row sums then their mean
            half = 0.5 * scale.clamp(min=EPS)
            codes = (w > half).to(x.dtype) - (w < -half).to(x.dtype)
            y = (quantize_activation_opaque(x, 1).unsqueeze(-2) * codes).sum(-1)
            return y * scale.clamp(min=EPS).to(x.dtype)
        if in_f % 4:
            return None
        xq = quantize_activation_opaque(x, 4)  # (..., 4, in / 4)
        rows = packed.view(out_f, in_f // 4)
        y = sum((xq[..., s, None, :] * (((rows >> (2 * s)) & 3).to(x.dtype) - 1)).sum(-1) for s in range(4))
        return y * self.weight_scale.to(x.dtype).reshape(())
