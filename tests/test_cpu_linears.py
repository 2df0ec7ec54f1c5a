"""CPU decoding linears: the layouts and the compiled one-row product of
andromeda.infer.cpu_linears keep every value, name and tie, and the one-row product really
runs as a multiply-and-sum (no matrix-product kernel) when compiled."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from andromeda.infer.cpu_linears import RowLinear, prepare_cpu_linears
from andromeda.model import build_model
from andromeda.presets import get_preset

# The matrix-product kernels of ATen's core operator set, which F.linear runs through.
MATRIX_PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "matmul", "linear"}


class MatrixProductSpy(TorchDispatchMode):
    """Records whether any matrix-product kernel runs (as opposed to elementwise and
    reduction kernels), at the dispatcher, where the kernels are chosen."""

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATRIX_PRODUCTS:
            self.products += 1
        return func(*args, **(kwargs or {}))


def run_compiled(fn, x):
    """fn(x) under torch.compile (dynamo traces it, so `compiled_few_rows` sees a compiling
    trace); the captured graph runs eagerly under the spy. Returns (output, products run)."""
    spy = MatrixProductSpy()

    def backend(gm, example_inputs):
        def run(*args):
            with spy:
                return gm(*args)
        return run
    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(x)
    return out, spy.products


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_are_a_reduction_when_compiled_and_linear_otherwise(bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    lin.__class__ = RowLinear
    many = torch.randn(3, 2, 24)  # 6 rows > REDUCTION_MAX_ROWS
    for few in (torch.randn(1, 1, 24), torch.randn(4, 1, 24)):
        out, products = run_compiled(lin, few)
        assert products == 0  # the multiply-and-sum path: no matrix-product kernel
        torch.testing.assert_close(out, F.linear(few, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    out, products = run_compiled(lin, many)
    assert products == 1  # more rows: the plain product
    torch.testing.assert_close(out, F.linear(many, lin.weight, lin.bias))
    # Negative control for the spy: a plain nn.Linear on few rows does run a matrix product.
    plain = nn.Linear(24, 40, bias=bias)
    assert run_compiled(plain, few)[1] == 1
    with MatrixProductSpy() as spy:  # eager: plain linear
        torch.testing.assert_close(lin(few), F.linear(few, lin.weight, lin.bias))
    assert spy.products == 2


def test_prepare_keeps_values_names_and_ties_in_both_modes():
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny")
    cfg.tie_embeddings = True
    model = build_model(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        reference = model(x)
    # Eager, then compiled; a compiled preparation is never undone (a compiled step may rely on it).
    for compiled, expect_compiled in ((False, False), (True, True), (False, True)):
        prepare_cpu_linears(model, compiled)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all((type(m) is RowLinear) == expect_compiled for m in linears)
        wide = [m.weight for m in linears if m.weight.shape[0] > m.weight.shape[1] and m is not model.head]
        assert wide and all(w.is_contiguous() == expect_compiled for w in wide)  # eager: input-major
        assert model.head.weight is model.embed.weight and model.embed.weight.is_contiguous()
        state = model.state_dict()
        assert state.keys() == before.keys()
        for k in before:
            torch.testing.assert_close(state[k], before[k], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
