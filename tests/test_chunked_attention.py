"""The 'chunked' CPU attention path (query blocks, bias built per block) equals the
explicit-bias reference, and never allocates an Lq x Lk bias."""

import pytest
import torch

from andromeda.model import backends
from andromeda.model.backends import AttnSpec, attend, force_backend


def _inputs(heads=4, kv_heads=2, length=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, 8, generator=g)
    k = torch.randn(2, kv_heads, length, 8, generator=g)
    v = torch.randn(2, kv_heads, length, 8, generator=g)
    return q, k, v


def _spec(length, **kw):
    pos = torch.arange(length)
    return AttnSpec(q_pos=pos[None], k_pos=pos, scale=8 ** -0.5, **kw)


CASES = {
    "alibi": dict(alibi=torch.tensor([0.5, 0.25, 0.125, 0.0]), alibi_heads=3),
    "window": dict(window=5),
    "alibi+docs": dict(alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]), alibi_heads=4,
                       doc_ids=torch.cat([torch.zeros(2, 12), torch.ones(2, 25)], 1).int()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_equals_reference(case, monkeypatch):
    monkeypatch.setattr(backends, "QUERY_CHUNK", 8)  # 37 rows -> 5 blocks, last one partial
    q, k, v = _inputs()
    spec = _spec(q.shape[2], **CASES[case])
    with force_backend("reference"):
        ref = attend(q, k, v, spec)
    with force_backend("chunked"):
        got = attend(q, k, v, spec)
    assert torch.allclose(got, ref, atol=1e-5)
    # Negative control: a block's bias built from the wrong rows changes the result.
    wrong = AttnSpec(**{**spec.__dict__, "q_pos": spec.q_pos + 3})
    with force_backend("chunked"):
        assert not torch.allclose(attend(q, k, v, wrong), ref, atol=1e-3)


def test_auto_picks_chunked_for_long_cpu_prefill_and_bias_stays_blockwise(monkeypatch):
    monkeypatch.setattr(backends, "QUERY_CHUNK", 8)
    q, k, v = _inputs(length=40)
    spec = _spec(40, **CASES["alibi"])
    assert backends.choose_backend(spec, q.device) == "chunked"
    assert backends.choose_backend(_spec(8, **CASES["alibi"]), q.device) == "reference"
    shapes = []
    real = backends.score_bias

    def recording(s, dtype, rows=slice(None)):
        out = real(s, dtype, rows=rows)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(backends, "score_bias", recording)
    attend(q, k, v, spec)
    assert shapes and max(shape[-2] for shape in shapes) == 8  # never the full 40 x 40
