"""Equivalence and property tests of the core model on tiny CPU configs.

For every option family: causality, cached incremental decoding == full forward (also with
chunked prefill and tensor positions), backends agree with the reference math.
"""

import math

import pytest
import torch

from andromeda.model.backends import force_backend
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

VOCAB = 61

# name -> overrides of a small base config; each exercises one option (or the spec's combos).
VARIANTS = {
    "mha-rope": dict(),
    "gqa": dict(attention=dict(heads=4, kv_heads=2)),
    "mqa": dict(attention=dict(heads=4, kv_heads=1)),
    "head-dim": dict(attention=dict(heads=2, head_dim=24)),
    "qk-rms": dict(attention=dict(heads=4, qk_norm="rms")),
    "qk-layer-noscale": dict(attention=dict(heads=4, qk_norm="layer", qk_norm_dim_scale=False, qk_norm_scale=4.0)),
    "bias": dict(attention=dict(heads=4, bias=True), mlp=dict(kind="gelu", bias=True)),
    "no-pos": dict(position=dict(kind="none")),
    "learned": dict(position=dict(kind="learned")),
    "partial-rope": dict(position=dict(kind="rope", rope_dim=8)),
    "rope-linear": dict(position=dict(kind="rope", rope_scaling="linear", rope_factor=4.0)),
    "rope-ntk": dict(position=dict(kind="rope", rope_scaling="ntk", rope_factor=4.0)),
    "rope-yarn": dict(position=dict(kind="rope", rope_scaling="yarn", rope_factor=4.0, original_max_seq_len=16)),
    "xpos": dict(position=dict(kind="xpos", xpos_scale_base=16.0)),
    "alibi-all": dict(position=dict(kind="none", alibi_heads=-1)),
    "alibi-xpos-mqa": dict(attention=dict(heads=4, kv_heads=1), position=dict(kind="xpos", alibi_heads=2)),
    "alibi-gqa": dict(attention=dict(heads=4, kv_heads=2), position=dict(kind="rope", alibi_heads=2)),
    "layernorm-post": dict(norm=dict(kind="layer", placement="post")),
    "deepnorm": dict(norm=dict(kind="layer", placement="deepnorm")),
    "geglu": dict(mlp=dict(kind="geglu")),
    "relu": dict(mlp=dict(kind="relu", hidden_dim=40)),
    "parallel": dict(block=dict(parallel=True)),
    "shift1": dict(block=dict(shift_tokens=1)),
    "shift3-parallel": dict(block=dict(shift_tokens=3, parallel=True)),
    "window": dict(attention=dict(heads=4, window=5)),
    "tied": dict(tie_embeddings=True),
    "andromeda-spec": dict(attention=dict(heads=4, kv_heads=1), position=dict(kind="xpos", alibi_heads=2),
                           norm=dict(kind="layer", placement="deepnorm"), mlp=dict(kind="gelu"),
                           block=dict(shift_tokens=1)),
    # The andromeda preset's x-transformers details: biases, skip gains, partial rotary on values too.
    "andromeda-xt": dict(attention=dict(heads=4, kv_heads=1), head_bias=True,
                         position=dict(kind="xpos", rope_dim=8, alibi_heads=2, rotate_values=True),
                         norm=dict(kind="layer", placement="deepnorm", bias=True), mlp=dict(kind="gelu", bias=True),
                         block=dict(shift_tokens=1, residual_gain=True)),
    "qk-l2": dict(attention=dict(heads=4, qk_norm="l2", qk_norm_scale=8.0)),
    "silu-gain": dict(mlp=dict(kind="silu"), block=dict(residual_gain=True)),
}


def make(variant: str, **extra) -> Transformer:
    base = dict(vocab_size=VOCAB, max_seq_len=64, dim=48, depth=2, attention=dict(heads=4))
    over = VARIANTS[variant]
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    base.update(extra)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(base)).eval()
    # Non-trivial norm gains and biases so that every parameter matters in the comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch=2, length=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    model = make(variant)
    x = tokens()
    t = 11
    y = x.clone()
    y[:, t:] = (y[:, t:] + 7) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-5), "a logit before t changed when tokens from t changed"
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3), "changing tokens did not change their logits"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_matches_full_forward(variant):
    model = make(variant)
    x = tokens()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch=2, max_len=32)
        parts = [model(x[:, :7], cache=cache, start_pos=0),  # prefill
                 model(x[:, 7:12], cache=cache, start_pos=7)]  # chunked prefill
        for i in range(12, x.shape[1]):  # one token at a time
            parts.append(model(x[:, i:i + 1], cache=cache, start_pos=i))
    inc = torch.cat(parts, dim=1)
    assert torch.allclose(full, inc, atol=2e-5), (full - inc).abs().max()


@pytest.mark.parametrize("variant", ["mha-rope", "alibi-xpos-mqa", "shift1", "window", "learned"])
def test_tensor_positions_match_int_positions(variant):
    """Compiled decoding passes start_pos as a tensor and reads the whole static cache."""
    model = make(variant)
    x = tokens(length=12)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch=2, max_len=16)
        parts = [model(x[:, :5], cache=cache, start_pos=torch.tensor(0))]
        for i in range(5, 12):
            parts.append(model(x[:, i:i + 1], cache=cache, start_pos=torch.tensor(i)))
    assert torch.allclose(full, torch.cat(parts, 1), atol=2e-5)


@pytest.mark.parametrize("variant", ["mha-rope", "alibi-all", "alibi-xpos-mqa", "alibi-gqa", "window", "gqa"])
def test_reference_backend_matches_sdpa(variant):
    """'auto' (which splits ALiBi and plain heads between kernels) and forced SDPA with a
    mask agree with the explicit-bias reference."""
    model = make(variant)
    x = tokens()
    with torch.no_grad():
        auto = model(x)
        with force_backend("reference"):
            ref = model(x)
        with force_backend("sdpa"):
            sdpa = model(x)
    assert torch.allclose(auto, ref, atol=1e-5)
    assert torch.allclose(sdpa, ref, atol=1e-5)


@pytest.mark.slow
def test_flex_backend_matches_reference():
    """FlexAttention (compiled; on CPU through inductor) computes ALiBi + causal + documents."""
    model = make("alibi-xpos-mqa")
    x = tokens(length=40)
    doc_ids = torch.cat([torch.zeros(2, 15), torch.ones(2, 25)], 1).int()
    with torch.no_grad():
        with force_backend("reference"):
            ref, ref_doc = model(x), model(x, doc_ids=doc_ids)
        with force_backend("flex"):
            flex, flex_doc = model(x), model(x, doc_ids=doc_ids)
    assert torch.allclose(flex, ref, atol=1e-4)
    assert torch.allclose(flex_doc, ref_doc, atol=1e-4)


def test_relative_schemes_are_shift_invariant():
    """RoPE, xPos and ALiBi depend only on position differences: the same tokens placed at
    another absolute offset give the same logits."""
    for variant in ["mha-rope", "xpos", "alibi-xpos-mqa", "window"]:
        model = make(variant)
        x = tokens()
        with torch.no_grad():
            a = model(x, start_pos=0)
            b = model(x, start_pos=9)
        assert torch.allclose(a, b, atol=2e-4), variant


def test_document_mask_isolates_documents():
    model = make("mha-rope")
    x = tokens(batch=1, length=20)
    doc = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed = model(x, doc_ids=doc)
        second_alone = model(x[:, 8:], start_pos=8)  # relative positions: offset is irrelevant
        first_alone = model(x[:, :8])
    assert torch.allclose(packed[:, :8], first_alone, atol=1e-5)
    assert torch.allclose(packed[:, 8:], second_alone, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = make("gqa")
    mha = make("mha-rope")
    sd = gqa.state_dict()
    hd, heads, kv = gqa.cfg.head_dim, 4, 2
    for i in range(gqa.cfg.depth):
        w = sd[f"layers.{i}.mixer.wqkv.weight"]
        q, k, v = w.split([heads * hd, kv * hd, kv * hd])
        rep = lambda t: t.view(kv, hd, -1).repeat_interleave(heads // kv, 0).reshape(heads * hd, -1)  # noqa: E731
        sd[f"layers.{i}.mixer.wqkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_kv_cache_stores_only_kv_heads():
    mqa, mha = make("mqa"), make("mha-rope")
    c1, c4 = mqa.new_cache(1, 32), mha.new_cache(1, 32)
    bytes_ = lambda c: sum(b.numel() for b in c.buffers())  # noqa: E731
    assert bytes_(c1) * 4 == bytes_(c4)


def test_attention_matches_explicit_formula_with_alibi_and_xpos():
    """One attention layer against a float64 implementation written from the papers."""
    model = make("alibi-xpos-mqa")
    attn = model.layers[0].mixer
    cfg = model.cfg
    torch.manual_seed(3)
    L, hd = 9, cfg.head_dim
    x = torch.randn(1, L, cfg.dim)
    from andromeda.model.state import Context, Positions
    pos = Positions.make(0, L, "cpu")
    ctx = Context(pos, model.rotary(pos.ids, torch.float32))
    with torch.no_grad():
        out, _ = attn(x, ctx)
    # reference
    xd = x.double()
    w = attn.wqkv.weight.double()
    q, k, v = (xd @ w.T).split([4 * hd, hd, hd], -1)
    q = q.view(L, 4, hd).transpose(0, 1)
    k, v = k.view(L, 1, hd).transpose(0, 1), v.view(L, 1, hd).transpose(0, 1)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = pos.ids[0].double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    zeta = (torch.arange(0, hd, 2, dtype=torch.float64) + 0.4 * hd) / (1.4 * hd)
    power = (pos.ids[0].double() - cfg.max_seq_len // 2) / cfg.position.xpos_scale_base
    scale = torch.cat([zeta] * 2)[None] ** power[:, None]

    def rot(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q) * scale, rot(k) / scale
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (4, L, L)
    slopes = torch.tensor([2 ** -4, 2 ** -8, 0.0, 0.0], dtype=torch.float64)  # ALiBi for 2 of 4 heads
    dist = (pos.ids[0][:, None] - pos.ids[0][None, :]).double()
    scores = scores - slopes[:, None, None] * dist
    scores = scores.masked_fill(dist < 0, float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(0, 1).reshape(1, L, 4 * hd) @ attn.wo.weight.double().T
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_alibi_slopes_follow_the_paper():
    from andromeda.model.position import alibi_slopes
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s6 = alibi_slopes(6)  # not a power of two: 4 geometric slopes + every other of the 8-head set
    expect = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert torch.allclose(s6, torch.tensor(expect))


def test_rope_scalings_match_transformers_reference():
    """Frequencies for linear / yarn / llama3 scaling against Hugging Face's implementation."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from andromeda.model.config import PositionConfig
    from andromeda.model.position import rope_inverse_frequencies
    dim, heads, max_pos = 64, 4, 256
    cases = [
        ("linear", dict(rope_type="linear", factor=4.0), dict(rope_scaling="linear", rope_factor=4.0)),
        ("yarn", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
         dict(rope_scaling="yarn", rope_factor=4.0, original_max_seq_len=64)),
        ("llama3", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64),
         dict(rope_scaling="llama3", rope_factor=8.0, original_max_seq_len=64)),
    ]
    for name, hf_scaling, ours in cases:
        hf_cfg = LlamaConfig(hidden_size=dim * heads // 4 * 4, num_attention_heads=heads, rope_theta=10000.0,
                             max_position_embeddings=max_pos, rope_scaling={**hf_scaling, "rope_theta": 10000.0})
        hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[name](hf_cfg, "cpu")
        inv, factor = rope_inverse_frequencies(PositionConfig(kind="rope", **ours), hf_cfg.head_dim, max_pos)
        assert torch.allclose(inv, hf_inv.float(), rtol=1e-5), name
        assert factor == pytest.approx(hf_factor), name


def test_ntk_and_linear_scaling_definitions():
    from andromeda.model.config import PositionConfig
    from andromeda.model.position import rope_inverse_frequencies
    base, _ = rope_inverse_frequencies(PositionConfig(), 16, 64)
    lin, _ = rope_inverse_frequencies(PositionConfig(rope_scaling="linear", rope_factor=4.0), 16, 64)
    ntk, _ = rope_inverse_frequencies(PositionConfig(rope_scaling="ntk", rope_factor=4.0), 16, 64)
    assert torch.allclose(lin, base / 4)
    assert torch.allclose(ntk[0], base[0])  # highest frequency kept
    assert torch.allclose(ntk[-1], base[-1] / 4)  # lowest frequency interpolated by the factor


def test_token_shift_definition():
    from andromeda.model.block import TokenShift
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6)
    out = TokenShift(2, 6)(x)  # groups of 2 channels shifted by 0, 1, 2
    assert torch.equal(out[..., 0:2], x[..., 0:2])
    assert torch.equal(out[:, 1:, 2:4], x[:, :-1, 2:4]) and torch.all(out[:, 0, 2:4] == 0)
    assert torch.equal(out[:, 2:, 4:6], x[:, :-2, 4:6]) and torch.all(out[:, :2, 4:6] == 0)


def test_deepnorm_scales_follow_the_formula():
    from andromeda.model.layer import deepnorm_alpha, deepnorm_beta
    depth = 12
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=256, depth=depth, attention=dict(heads=4),
                                    norm=dict(placement="deepnorm", kind="layer"), mlp=dict(kind="gelu")))
    assert model.layers[0].alpha == pytest.approx((2 * depth) ** 0.25) == pytest.approx(deepnorm_alpha(depth))
    beta = (8 * depth) ** -0.25
    assert deepnorm_beta(depth) == pytest.approx(beta)
    attn = model.layers[3].mixer
    q, k, v = attn.wqkv.weight.split([256, 256, 256])
    xavier = math.sqrt(2.0 / (256 + 256))
    assert q.std().item() == pytest.approx(xavier, rel=0.05)
    assert v.std().item() == pytest.approx(beta * xavier, rel=0.05)
    assert attn.wo.weight.std().item() == pytest.approx(beta * xavier, rel=0.05)
    w_in = model.layers[3].ffn.w_in.weight
    assert w_in.std().item() == pytest.approx(beta * math.sqrt(2.0 / (256 + 1024)), rel=0.05)


def test_pre_norm_residual_projections_are_scaled():
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=256, depth=8, attention=dict(heads=4)))
    std = model.layers[0].mixer.wo.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_tied_embeddings_share_storage():
    model = make("tied")
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_glu_hidden_size_rounding():
    from andromeda.model.config import MLPConfig
    assert MLPConfig(kind="swiglu", multiple_of=256).resolved_hidden(4096) == 11008
    assert MLPConfig(kind="gelu").resolved_hidden(100) == 400
    assert MLPConfig(kind="swiglu", hidden_dim=77).resolved_hidden(100) == 77


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = make("mha-rope").train()
    b = make("mha-rope", block=dict(checkpoint_activations=True)).train()
    b.load_state_dict(a.state_dict())
    x = tokens()
    for m in (a, b):
        m(x).logsumexp(-1).mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_every_parameter_gets_gradient():
    for variant in ["andromeda-spec", "qk-rms", "learned", "parallel", "bias"]:
        model = make(variant).train()
        model(tokens()).logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{variant}: {name} got no gradient"


@pytest.mark.parametrize("variant", ["andromeda-spec", "mha-rope", "parallel", "learned"])
def test_short_training_lowers_loss(variant):
    """A few Adam steps on a repeating pattern drive the loss well below its start."""
    model = make(variant).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32])
    x = pattern.repeat(4)[None].repeat(4, 1)
    losses = []
    for _ in range(40):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::8]
