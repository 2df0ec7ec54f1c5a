"""BitNet b1.58: the quantisers against the paper's equations, the straight-through
estimator, 2-bit packing (size and exact logits), models with ternary families, config
validation."""

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

from andromeda.errors import ConfigError, UserError
from andromeda.model import build_model
from andromeda.model.bitlinear import BitLinear, quantize_activation, quantize_weight
from andromeda.presets import get_preset
from andromeda.quant.bitpack import (
    PACKED_WEIGHTS,
    load_packed,
    pack_model,
    pack_ternary,
    save_packed,
    ternary_bytes,
    unpack_ternary,
)

ALL_BITNET = dict(attention="bitnet", mlp="bitnet", mixer="bitnet", router="bitnet")


def test_weight_quantisation_is_absmean_ternary():
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    q = quantize_weight(w)
    gamma = w.abs().mean()  # paper eq. (3): gamma = mean |W|
    expected = torch.clamp(torch.round(w / gamma), -1, 1) * gamma  # RoundClip(W / gamma, -1, 1)
    torch.testing.assert_close(q, expected)
    assert set(torch.unique(q / gamma).round().tolist()) <= {-1.0, 0.0, 1.0}


def test_per_expert_scales_for_stacked_weights():
    w = torch.randn(3, 8, 8) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    q = quantize_weight(w)
    for e in range(3):
        torch.testing.assert_close(q[e], quantize_weight(w[e]))


def test_activation_quantisation_is_8bit_absmax_per_token_after_rmsnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 32) * 3
    q = quantize_activation(x)
    n = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    scale = 127 / n.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(q, torch.clamp(torch.round(n * scale), -127, 127) / scale)
    for row in (q * scale).reshape(-1, 32):
        assert len(torch.unique(row.round())) <= 255


def test_straight_through_estimator_passes_gradients_unchanged():
    w = torch.randn(6, 7, requires_grad=True)
    g = torch.randn(6, 7)
    (quantize_weight(w) * g).sum().backward()
    torch.testing.assert_close(w.grad, g)


def test_bitlinear_matches_quantised_dense_product():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = F.linear(quantize_activation(x), quantize_weight(layer.weight), layer.bias)
        torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("in_features", [32, 30])  # packed rows: whole bytes, and not
def test_compiled_one_row_product_matches_eager(packed, in_features):
    """Batch-1 decoding under torch.compile on CPU takes BitLinear's reduction form (codes
    compared against scale / 2, or read two bits at a time from the packed rows); it must
    give the eager layer's output."""
    from andromeda.quant.bitpack import pack_module
    torch.manual_seed(0)
    layer = BitLinear(in_features, 24, bias=True)
    if packed:
        pack_module(layer)
    one_row, few, rows = torch.randn(1, 1, in_features), torch.randn(3, 1, in_features), torch.randn(2, 3, in_features)
    with torch.no_grad():
        for x in (one_row, few, rows):
            torch._dynamo.reset()
            compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_eager_inference_reuses_the_quantised_weight_until_it_changes():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        first = layer(x)
        cached = layer._inference_weights["weight"][1]
        assert layer(x) is not first and layer._inference_weights["weight"][1] is cached
        layer.weight.mul_(-1)  # an optimizer step or a load: the version moves
        torch.testing.assert_close(layer(x), -first)
        assert layer._inference_weights["weight"][1] is not cached
    layer(x).sum().backward()  # a training forward drops the copy
    assert not layer._inference_weights and layer.weight.grad is not None


def test_dequantised_unpack_equals_codes_times_scale():
    from andromeda.quant.bitpack import unpack_dequantized
    codes = torch.randint(-1, 2, (3, 5, 7), dtype=torch.int8)
    packed = pack_ternary(codes)
    for scale in (torch.tensor([[0.25]]), torch.tensor([0.5, 2.0, 3.0]).view(3, 1, 1)):
        torch.testing.assert_close(unpack_dequantized(packed, codes.shape, scale), codes.float() * scale)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 64])
def test_pack_unpack_roundtrip(n):
    codes = torch.randint(-1, 2, (n,), dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 3) // 4
    assert torch.equal(unpack_ternary(packed, (n,)), codes)


def test_packed_model_gives_same_logits_and_is_7x_smaller(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("anemone-1.58-tiny")  # ternary attention, MoA, Mamba, MoE experts and routers
    model = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(x)
    dense_bytes, packed_bytes = ternary_bytes(model)
    assert dense_bytes / packed_bytes >= 7.0
    save_packed(tmp_path / "packed", model, meta={"note": "test"})
    loaded, _, config = load_packed(tmp_path / "packed")
    assert config["meta"]["packed"] == "bitnet-2bit"
    assert not any(isinstance(m, BitLinear) and "weight" in m._parameters for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=1e-5)
        cache = loaded.new_cache(2, 12)
        steps = [loaded(x[:, :6], cache=cache)] + [loaded(x[:, t:t + 1], cache=cache, start_pos=t)
                                                   for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), ref, atol=2e-5, rtol=2e-5)
    assert ternary_bytes(loaded) == (dense_bytes, packed_bytes)
    assert (tmp_path / "packed" / PACKED_WEIGHTS).stat().st_size < 0.6 * dense_bytes
    from andromeda.checkpoint import load_checkpoint  # generate/eval load packed folders too
    via_checkpoint, _, _ = load_checkpoint(tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(via_checkpoint(x), ref, atol=1e-5, rtol=1e-5)


def test_packing_a_dense_model_is_refused():
    with pytest.raises(UserError, match="no BitNet layers"):
        pack_model(build_model(tiny_config()))


def test_bitnet_model_causal_cached_and_all_parameters_learn():
    torch.manual_seed(0)
    model = build_model(tiny_config(linear=dict(attention="bitnet", mlp="bitnet")))
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2 * 4  # wqkv, wo, w_in, w_out
    x = tokens(2, 12)
    assert_causal(model, x, t=5)
    assert_cached_matches_full(model, x)
    assert_all_parameters_learn(model, tokens(4, 16))


def test_attention_stays_dense_when_only_mlp_is_ternary():
    model = build_model(get_preset("anemone-tiny"))
    families = {type(m).__name__ for m in model.modules()}
    assert "BitLinear" in families
    for m in model.modules():
        if type(m).__name__ == "MixtureOfAttentionHeads":
            assert not m.bitnet and not isinstance(m.wkv, BitLinear)
        if type(m).__name__ == "Mamba":
            assert isinstance(m.in_proj, BitLinear)


def test_ffn_only_preset_keeps_attention_and_mamba_dense():
    model = build_model(get_preset("anemone-1.58-ffn-tiny"))
    for m in model.modules():
        if type(m).__name__ == "Mamba":
            assert not isinstance(m.in_proj, BitLinear) and not isinstance(m.out_proj, BitLinear)
        if type(m).__name__ == "MoE":
            assert m.bitnet
        if type(m).__name__ == "GatedMLP":
            assert isinstance(m.w_in, BitLinear)


def test_tiny_bitnet_training_beats_unigram():
    loss, unigram = train_beats_unigram(tiny_config(linear=dict(attention="bitnet", mlp="bitnet")), steps=40)
    assert loss < 0.5 * unigram, (loss, unigram)


def test_unknown_linear_kind_or_family_is_a_config_error():
    with pytest.raises(ConfigError, match="linear.mlp=.ternary. is not supported"):
        build_model(tiny_config(linear=dict(mlp="ternary")))
    with pytest.raises(ConfigError, match="unknown config key in linear: ffn"):
        build_model(tiny_config(linear=dict(ffn="bitnet")))
