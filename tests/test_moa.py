"""Mixture of Attention Heads: the batched head-major formulation against a per-token,
per-expert reference, cached decoding, gradients, a tiny training run, config validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from arch_checks import (
    assert_all_parameters_learn,
    assert_cached_matches_full,
    assert_causal,
    tiny_config,
    tokens,
    train_beats_unigram,
)

from andromeda.errors import ConfigError
from andromeda.model import ModelConfig, build_model, count_parameters
from andromeda.model.moa import MixtureOfAttentionHeads
from andromeda.model.position import apply_rotary
from andromeda.model.state import Context, Positions

MOA = dict(num_experts=4, top_k=2)


def reference_moa(model, moa: MixtureOfAttentionHeads, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their selected experts; every expert head attends causally to
    the shared keys/values of its KV group (JetMoE's MoA)."""
    B, L, _ = x.shape
    he, kvh, hd, k = moa.expert_heads, moa.kv_heads, moa.head_dim, moa.k
    rt = model.rotary(torch.arange(L), x.dtype)
    kv = moa.wkv(x).view(B, L, 2, kvh, hd)
    keys = apply_rotary(kv[:, :, 0].transpose(1, 2), rt.cos, rt.sin)  # (B, kvh, L, hd)
    values = kv[:, :, 1].transpose(1, 2)
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(L):
            probs = F.softmax(moa.router.proj(x[b, t]).float(), dim=-1)
            gates, experts = probs.topk(k)
            gates = gates / gates.sum()
            for g, e in zip(gates, experts.tolist()):
                q = (x[b, t] @ moa.w_q[e]).view(1, he, 1, hd).squeeze(0)  # (he, 1, hd)
                q = apply_rotary(q[None], rt.cos[t:t + 1], rt.sin[t:t + 1])[0]
                heads = []
                for h in range(he):
                    kv_head = h // (he // kvh)
                    scores = (q[h] @ keys[b, kv_head, : t + 1].T) / math.sqrt(hd)
                    heads.append(F.softmax(scores, dim=-1) @ values[b, kv_head, : t + 1])
                out[b, t] += g * (torch.cat(heads, dim=-1).reshape(-1) @ moa.w_o[e])
    return out


def test_matches_per_token_reference():
    torch.manual_seed(0)
    cfg = tiny_config(heads=4, kv_heads=1, moa=MOA)
    model = build_model(cfg)
    moa = model.layers[0].mixer
    assert isinstance(moa, MixtureOfAttentionHeads) and moa.expert_heads == 2
    x = torch.randn(2, 6, cfg.dim)
    pos = Positions.make(0, 6, "cpu")
    ctx = Context(pos, model.rotary(pos.ids, x.dtype))
    with torch.no_grad():
        torch.testing.assert_close(moa(x, ctx)[0], reference_moa(model, moa, x), atol=1e-5, rtol=1e-5)


def test_moa_model_causal_and_cached():
    torch.manual_seed(0)
    model = build_model(tiny_config(moa=MOA))
    x = tokens(2, 12)
    assert_causal(model, x, t=5)
    assert_cached_matches_full(model, x)


def test_kv_cache_is_shared_across_experts():
    model = build_model(tiny_config(moa=MOA))
    cache = model.new_cache(1, 16)
    kv = cache.layers[0].mixer
    assert kv.k.shape == (1, 2, 16, model.cfg.head_dim)  # kv_heads keys, not experts x heads


def test_active_parameters_exclude_unrouted_query_experts():
    cfg = tiny_config(moa=dict(num_experts=6, top_k=2))
    total, active = count_parameters(build_model(cfg, device="meta"))
    per_expert = 2 * cfg.dim * (cfg.attention.heads // 2) * cfg.head_dim
    assert total - active == cfg.depth * (6 - 2) * per_expert


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_config(moa=MOA))
    assert_all_parameters_learn(model, tokens(4, 32))


def test_tiny_moa_training_beats_unigram():
    loss, unigram = train_beats_unigram(tiny_config(moa=MOA), steps=40)
    assert loss < 0.5 * unigram, (loss, unigram)


@pytest.mark.parametrize("kwargs,match", [
    (dict(moa=dict(num_experts=2, top_k=3)), "top_k"),
    (dict(heads=6, kv_heads=2, dim=48, moa=dict(num_experts=4, top_k=4)), "must divide attention.heads"),
    (dict(heads=4, kv_heads=4, moa=dict(num_experts=4, top_k=2)), "divisible by attention.kv_heads"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(tiny_config(**kwargs))


def test_alibi_is_refused():
    d = tiny_config(moa=MOA).to_dict()
    d["position"]["alibi_heads"] = 2
    with pytest.raises(ConfigError, match="ALiBi"):
        ModelConfig.from_dict(d)
