"""PyTorch's own CPU kernels for products with int8 / int4 weights, used for the few rows of
a decoding step.

Offers `int8_rows(x, codes, scale)` and `int4_rows(x, packed, scale, group_size)`: y = x W^T
for float32 x of a few rows against the weights of `andromeda.quant.weight_only`'s formats,
and `int8_available()` / `int4_available()`. Both are registered as torch custom ops
(`andromeda::int8_rows`, `andromeda::int4_rows`), so a compiled decoding graph calls them as
opaque kernels and fuses everything around them.

- int8: FBGEMM's dynamic quantised linear (`quantized::linear_dynamic`, shipped in PyTorch's
  x86 builds): each activation row is quantised to uint8 with its own scale and zero point,
  multiplied with the int8 codes in integer arithmetic (AVX-512 VNNI where the CPU has it)
  and rescaled per output channel. Our per-channel codes and scales become its prepacked
  weight unchanged. Measured on a 2-core Intel Xeon (AVX-512 VNNI), one thread, one row x
  4096x1024: 187 us against 605 us for float32 `F.linear` and ~370 us for a compiled
  multiply-and-sum over the codes, which converts every byte to float and is bound by that
  conversion (benchmarks/RESULTS.md, "Weight-only int8 / int4 decoding").
- int4: `aten._weight_int4pack_mm_for_cpu`, the int4 kernel PyTorch ships for CPUs (gpt-fast
  and torchao use it), with bfloat16 activations: our codes (c + 8 in a nibble) and group
  scales map onto its packed layout with zero points of 0. With float32 activations the op
  runs an unvectorised loop (~10x slower), so rows are rounded to bfloat16 for the product
  and the result comes back as float32.

Numerics: the int8 product quantises the activations (to 8 bits per row), the int4 one
rounds them to bfloat16; both differ from the float product over the dequantised weights by
well under 1% (relative norm, tested), the size of the weight quantisation's own error.
llama.cpp's q8_0 / q4_0 products do the same (activations quantised to 8 bits per block).

Each row is computed by its own call, so a row's result never depends on the other rows of
the batch (the per-row activation scale would otherwise be per-tensor): a server's batch
invariance holds. The packed weights are made once per codes tensor, at the first call, and
kept on it; they double the int8 bytes held in memory (the codes stay
for prefill, eval and saving).

Why these and not torchao: torchao 0.18's int8 weight-only path decodes slower than float32
here and it has no float32 CPU int4 layout (see andromeda.quant.weight_only).
"""

from __future__ import annotations

import functools
import warnings

import torch

# Registered with torch.library's low-level API, a CPU kernel only: a call costs ~19 us
# against ~26 us through `torch.library.custom_op` (whose autograd and dispatch wrappers run
# in Python) for a 384x384 product of 14 us. The ops are for inference; they have no
# autograd formula.
_LIB = torch.library.Library("andromeda", "DEF")
_LIB.define("int8_rows(Tensor x, Tensor codes, Tensor scale) -> Tensor")
_LIB.define("int4_rows(Tensor x, Tensor packed, Tensor scale, int group_size) -> Tensor")


def _cached(codes: torch.Tensor, make):
    """make()'s result, kept on the codes tensor itself (so it lives exactly as long as the
    weights) and remade when the codes change in place (their version counter moves)."""
    hit = getattr(codes, "_andromeda_packed", None)
    if hit is not None and hit[0] == codes._version:
        return hit[1]
    value = make()
    codes._andromeda_packed = (codes._version, value)
    return value


def _by_row(product, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """product(one row (1, in)) for each row of x (..., in), so rows never see each other."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:
        y = product(rows)
    else:
        y = torch.cat([product(rows[i:i + 1]) for i in range(rows.shape[0])])
    return y.view(*x.shape[:-1], out_features)


# ---- int8: FBGEMM dynamic quantised linear ----

def _int8_prepack(codes: torch.Tensor, scale: torch.Tensor):
    with warnings.catch_warnings():  # quantised-tensor constructors warn of a future removal
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


def _int8_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    packed = _cached(codes, lambda: _int8_prepack(codes, scale))
    if x.numel() == x.shape[-1]:  # one row (batch-1 decoding): the op takes any leading shape
        return torch.ops.quantized.linear_dynamic(x, packed, False)
    return _by_row(lambda row: torch.ops.quantized.linear_dynamic(row, packed, False), x, codes.shape[0])


def int8_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) float32 @ (codes int8 (out, in) * scale (out,))^T, row by row."""
    return torch.ops.andromeda.int8_rows(x, codes, scale)


_LIB.impl("int8_rows", _int8_rows, "CPU")


@torch.library.register_fake("andromeda::int8_rows")
def _(x, codes, scale):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@functools.cache
def int8_available() -> bool:
    """FBGEMM's x86 kernels are in this build and give the right numbers on a probe."""
    if not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(-127, 128, (8, 64), dtype=torch.int8, generator=g)
        scale = torch.rand(8, generator=g) + 0.5
        x = torch.randn(2, 64, generator=g)
        got = int8_rows(x, codes, scale)
        want = x @ (codes.float() * scale[:, None]).t()
        return bool(((got - want).norm() <= 0.02 * want.norm()).item())
    except (RuntimeError, AttributeError, NotImplementedError):  # op missing or refused: portable path
        return False


# ---- int4: aten._weight_int4pack_mm_for_cpu with bfloat16 activations ----

INT4_OUT_MULTIPLE = 16
"""The kernel's packing needs the output width to be a multiple of this; other layers keep
the portable paths."""

def _int4_prepack(packed: torch.Tensor, scale: torch.Tensor, group_size: int):
    out_f, groups = scale.shape
    b = packed.view(out_f, groups, group_size // 2)
    nibbles = torch.cat([b & 15, b >> 4], dim=-1).reshape(out_f, groups * group_size).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    # (groups, out, 2): its dequantisation is (q - 8) * scale + zero; ours has zero 0.
    scales_and_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1)
    return weight, scales_and_zeros.to(torch.bfloat16).contiguous()


def _int4_rows(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    weight, sz = _cached(packed, lambda: _int4_prepack(packed, scale, group_size))
    return _by_row(lambda row: torch.ops.aten._weight_int4pack_mm_for_cpu(row, weight, group_size, sz),
                   x.to(torch.bfloat16), scale.shape[0]).to(x.dtype)


def int4_rows(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (..., in) float32 @ the int4 weight (weight_only layout)^T, row by row in bfloat16."""
    return torch.ops.andromeda.int4_rows(x, packed, scale, group_size)


_LIB.impl("int4_rows", _int4_rows, "CPU")


@torch.library.register_fake("andromeda::int4_rows")
def _(x, packed, scale, group_size):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


@functools.cache
def int4_available() -> bool:
    """The int4 CPU kernel exists in this build and gives the right numbers on a probe."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    try:
        from andromeda.quant.weight_only import dequantize_int4, quantize_int4

        g = torch.Generator().manual_seed(0)
        packed, scale = quantize_int4(torch.randn(INT4_OUT_MULTIPLE, 64, generator=g), 32)
        x = torch.randn(2, 64, generator=g)
        got = int4_rows(x, packed, scale, 32)
        want = x @ dequantize_int4(packed, scale, 32).t()
        return bool(((got - want).norm() <= 0.02 * want.norm()).item())
    except (RuntimeError, AttributeError, NotImplementedError):  # op missing or refused: portable path
        return False
