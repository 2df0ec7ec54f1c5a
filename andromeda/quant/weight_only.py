"""Weight-only int8 and int4 quantisation of a built model, and decoding straight from the bytes.

Offers:
- `quantize_int8(w)` / `quantize_int4(w, group_size)`: a float (out, in) matrix -> its codes and
  scales; `dequantize_int8` / `dequantize_int4` invert them.
- `Int8Linear`, `Int4Linear`, `Int8Embedding`: modules that hold only the codes and scales
  (buffers) and compute from them.
- `SCHEMES`, `GROUP_SIZES`: what is accepted.

Applying them to a whole model, saving and loading: `andromeda.quant.quantize`.

Schemes:
- int8: one float32 scale per output channel, symmetric codes in [-127, 127] (absmax / 127).
- int4: one float32 scale per group of `group_size` input features, symmetric codes in [-8, 7].
  Each group's scale is the one of a few candidates (absmax / d, d in 7..8.5) with the least
  squared error, the clipping search llama.cpp's and AWQ's quantisers make. Two codes a byte:
  within a group, byte k holds feature k (low nibble) and feature k + group_size / 2 (high
  nibble), each as code + 8, so a group's activations split into two contiguous halves and
  the compiled product needs no interleaving copy.
- The head stays int8 under int4 by default, and the embedding is int8 per row (its rows are the
  head's channels, so a tied model keeps one int8 matrix for both); docs/quantization.md has
  the measurements behind this choice.

How it runs, for float32 inputs:
- up to KERNEL_MAX_ROWS rows on CPU (decoding, eager or compiled; a server's decode batch):
  PyTorch's int8 (FBGEMM) and int4 CPU kernels, through `andromeda.quant.cpu_kernels`, which
  quantise or round the activations (its docstring has the numbers and why);
- where those kernels are missing (non-x86 builds), under torch.compile on CPU with at most a
  few rows: a multiply-and-sum over the codes converted in registers, which Inductor turns
  into one vectorised pass over the int8 / packed int4 bytes (as `andromeda.infer.cpu_linears`
  does for float weights and `BitLinear` for ternary ones);
- elsewhere (prefill, eval, GPUs): the matrix is dequantised for the call and multiplied with
  `F.linear`, exactly.

Why by hand: torchao 0.18 (checked with torch 2.13 on this machine's CPUs) has no float32 CPU
int4 layout (its CPU layout was dropped; `plain` needs the mslk GPU kernels, `tile_packed_to_4d`
needs bf16 on CUDA) and its int8 weight-only tensor decodes slower than our compiled float32
(one-row products through `aten._weight_int8pack_mm`); benchmarks/RESULTS.md has the figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from andromeda.errors import UserError
from andromeda.model.linear import compiled_few_rows
from andromeda.quant import cpu_kernels

SCHEMES = {8: "int8", 4: "int4"}
GROUP_SIZES = (32, 64, 128)
_INT4_DIVISORS = (7.0, 7.25, 7.5, 7.75, 8.0, 8.25, 8.5)
KERNEL_MAX_ROWS = 16
"""Up to this many rows (decoding; the server's default batch) go through the CPU kernels; a
longer input (prefill, eval) is one exact product over the dequantised matrix."""
USE_CPU_KERNELS = True
"""False keeps every product on the portable paths (tests of those paths set it)."""


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scale float32 (out,)) with w ~= codes * scale[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    codes = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (out, in / 2), scale float32 (out, in / group_size))."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise UserError(f"int4 needs the input width ({in_f}) to be a multiple of the group size ({group_size})")
    g = w.detach().float().view(out_f, in_f // group_size, group_size)
    absmax = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    best_err, best_scale = None, None
    for d in _INT4_DIVISORS:  # clipping search: least squared error per group
        scale = absmax / d
        err = ((g / scale).round().clamp(-8, 7) * scale - g).pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    codes = ((g / best_scale).round().clamp(-8, 7) + 8).to(torch.uint8)  # (out, groups, G) in 0..15
    half = group_size // 2
    packed = codes[..., :half] | (codes[..., half:] << 4)
    return packed.reshape(out_f, in_f // 2).contiguous(), best_scale.squeeze(-1).contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f = packed.shape[0]
    groups = scale.shape[1]
    b = packed.view(out_f, groups, group_size // 2)
    codes = torch.cat([b & 15, b >> 4], dim=-1).to(scale.dtype) - 8  # (out, groups, G)
    return (codes * scale[..., None]).view(out_f, groups * group_size)


class _QuantLinear(nn.Module):
    """Shared parts: bias, shapes, and the eager product through the dequantised matrix."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        # has_kernel is settled when the module is made: probing inside a traced forward
        # would put the probe into the compiled graph.
        return (USE_CPU_KERNELS and self.has_kernel and x.device.type == "cpu" and x.dtype == torch.float32
                and x[..., 0].numel() <= KERNEL_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_kernel(x):
            y = self._kernel_product(x)
        elif compiled_few_rows(x):
            y = self._few_rows_product(x)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """y = x (codes * scale)^T + b, codes int8 per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.has_kernel = cpu_kernels.int8_available()

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
        m.weight_int8, m.weight_scale = quantize_int8(lin.weight)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale)

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.int8_rows(x, self.weight_int8, self.weight_scale)

    def _few_rows_product(self, x: torch.Tensor) -> torch.Tensor:
        # One pass over the int8 rows; the scale applies once per output.
        y = (x.unsqueeze(-2) * self.weight_int8.to(x.dtype)).sum(-1)  # (..., out)
        return y * self.weight_scale.to(x.dtype)


class Int4Linear(_QuantLinear):
    """y = x (codes * group scales)^T + b, two int4 codes a byte (layout: module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, device=device))
        self.has_kernel = out_features % cpu_kernels.INT4_OUT_MULTIPLE == 0 and cpu_kernels.int4_available()

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int) -> "Int4Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, device=lin.weight.device)
        m.weight_int4, m.weight_scale = quantize_int4(lin.weight, group_size)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.weight_int4, self.weight_scale, self.group_size)

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.int4_rows(x, self.weight_int4, self.weight_scale, self.group_size)

    def _few_rows_product(self, x: torch.Tensor) -> torch.Tensor:
        # sum_k x_k (c_k - 8) s_g = s_g (sum_k x_k c_k) - 8 s_g (sum_k x_k): the offset moves to a
        # small product with the group sums of x, and the bytes are widened to int32 once before
        # the nibbles are split, which saves a conversion per byte (about 1.35x faster on CPU).
        groups, half = self.in_features // self.group_size, self.group_size // 2
        xg = x.unflatten(-1, (groups, 2, half)).unsqueeze(-4)  # (..., 1, groups, 2, half)
        b = self.weight_int4.view(self.out_features, groups, half).to(torch.int32)
        part = xg[..., 0, :] * (b & 15).to(x.dtype) + xg[..., 1, :] * (b >> 4).to(x.dtype)  # (..., out, groups, half)
        scale = self.weight_scale.to(x.dtype)
        x_sums = x.unflatten(-1, (groups, self.group_size)).sum(-1).unsqueeze(-2)  # (..., 1, groups)
        return (part * scale.unsqueeze(-1)).sum((-2, -1)) - 8 * (scale * x_sums).sum(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """Token embedding from int8 rows with one scale per row (a lookup reads one row)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8,
                                                        device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, device=emb.weight.device)
        m.weight_int8, m.weight_scale = quantize_int8(emb.weight)
        return m

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight_int8).to(self.weight_scale.dtype)
        return rows * F.embedding(tokens, self.weight_scale.unsqueeze(-1))
