"""FLOPs per token counted by hand from the config, for every kind of layer the plan offers.

The trainer's count (andromeda.train.flops) goes through each layer's `flops_per_token`; these
tests write the same count out from the config's numbers (matrix shapes, experts reached,
attention span), PaLM / nanoGPT style: 2 FLOPs per multiply-add, attention scores over the
full span, training = 3 x forward. A layer that forgot its experts, its router, or counted a
Mixture-of-Depths block as if every token went through it would fail here.
"""

from __future__ import annotations

import math

import pytest

from andromeda.model import ModelConfig
from andromeda.model.transformer import build_model
from andromeda.train.flops import flops_per_token

V, D, H, KVH, HD, HID, T = 64, 32, 4, 2, 8, 64, 16
BASE = dict(vocab_size=V, dim=D, depth=2, max_seq_len=64, attention=dict(heads=H, kv_heads=KVH),
            mlp=dict(kind="swiglu", hidden_dim=HID))


def model_of(**overrides):
    return build_model(ModelConfig(**{**BASE, **overrides}), device="meta")


def attention(span=T):
    projections = D * (H * HD + 2 * KVH * HD) + H * HD * D  # wqkv, wo
    return 2 * projections + 4 * H * HD * span  # q.k^T and p.v over the span


def dense_ffn():
    return 2 * (D * 2 * HID + HID * D)  # SwiGLU: [gate; up] then down


def block(mixer, ffn):
    return mixer + ffn + 2 * 2 * D  # two RMSNorm gains


def head():
    return 2 * D * V + 2 * D  # output projection and final norm


def test_dense_counts_every_matrix_once():
    expected = 3 * (2 * block(attention(), dense_ffn()) + head())
    assert flops_per_token(model_of(), T) == expected


def test_moe_counts_the_router_and_the_k_experts_a_token_reaches():
    E, k = 8, 2
    moe = 2 * D * E + k * dense_ffn()
    model = model_of(layout=dict(ffn="dense,moe"), moe=dict(num_experts=E, top_k=k))
    expected = 3 * (block(attention(), dense_ffn()) + block(attention(), moe) + head())
    assert flops_per_token(model, T) == expected
    # negative control: counting all experts (every parameter) would be far more
    assert 3 * (block(attention(), dense_ffn()) + block(attention(), 2 * D * E + E * dense_ffn()) + head()) > expected


def test_moa_counts_router_shared_kv_chosen_experts_and_scores():
    E, k = 4, 2
    heads_per_expert = H // k
    moa = (2 * D * E                                   # router
           + 2 * D * 2 * KVH * HD                      # shared k and v projection
           + k * 2 * (2 * D * heads_per_expert * HD)   # each chosen expert's q and o projections
           + 4 * (k * heads_per_expert) * HD * T)      # scores of the heads a token gets
    model = model_of(layout=dict(mixer="moa"), moa=dict(num_experts=E, top_k=k))
    assert flops_per_token(model, T) == 3 * (2 * block(moa, dense_ffn()) + head())


def test_mod_counts_routed_share_at_the_routed_length():
    capacity, hidden = 0.25, 16
    C = math.ceil(capacity * T)  # 4 of 16 tokens go through the routed block, as a 4-token sequence
    route = 2 * (D * 1 + D * hidden + hidden * 1)  # router and predictor matrices, on every token
    routed = route + C / T * block(attention(span=C), dense_ffn())
    model = model_of(layout=dict(routing="none,mod"), mod=dict(capacity=capacity, predictor_hidden=hidden))
    expected = 3 * (block(attention(), dense_ffn()) + routed + head())
    assert flops_per_token(model, T) == pytest.approx(expected, rel=1e-12)
    # negative control: every token through the block at full span is what this must not count
    unrouted = 3 * (2 * block(attention(), dense_ffn()) + head())
    assert flops_per_token(model, T) < 0.7 * unrouted


def test_mamba_counts_projections_conv_and_chunked_scan():
    expand, P, N, conv, chunk = 2, 16, 8, 4, 8
    inner = expand * D
    heads = inner // P
    conv_dim = inner + 2 * N  # x, B, C (one group)
    projections = D * (inner + conv_dim + heads) + inner * D  # in_proj (z, xBC, dt), out_proj
    small = inner + 3 * heads + conv_dim  # gated norm gain, dt_bias, A_log, D, conv bias: 2 each
    Tc = min(chunk, T)
    scan = 2 * heads * Tc * (N + P) + 4 * heads * P * N
    mamba = 2 * (projections + small) + 2 * conv_dim * conv + scan
    model = model_of(layout=dict(mixer="mamba,attention"),
                     mamba=dict(expand=expand, head_dim=P, d_state=N, d_conv=conv, chunk_size=chunk))
    expected = 3 * (block(mamba, dense_ffn()) + block(attention(), dense_ffn()) + head())
    assert flops_per_token(model, T) == expected
