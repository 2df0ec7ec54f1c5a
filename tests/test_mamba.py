"""Mamba-2 mixer: the chunked SSD scan against the plain recurrence, cached decoding, the
Jamba layout, and config validation."""

import pytest
import torch
from arch_checks import (
    assert_all_parameters_learn,
    assert_cached_matches_full,
    assert_causal,
    tiny_config,
    tokens,
    train_beats_unigram,
)

from andromeda.errors import ConfigError
from andromeda.model import ModelConfig, build_model
from andromeda.model.mamba import Mamba, mamba_chunk_scan_combined, ssd_chunked, ssd_step

MAMBA = dict(d_state=8, head_dim=8, chunk_size=4)


def recurrence(x, dt, A, B, C, h0):
    """The selective SSM written step by step (Mamba-2 eq.): h_t = exp(dt_t A) h_{t-1} +
    dt_t x_t B_t^T, y_t = h_t C_t; per head, state (p, n)."""
    l, H = x.shape[1], x.shape[2]
    h, ys = h0.clone(), []
    for t in range(l):
        for hh in range(H):
            decay = torch.exp(dt[:, t, hh] * A[hh])[:, None, None]
            h[:, hh] = decay * h[:, hh] + dt[:, t, hh, None, None] * x[:, t, hh, :, None] * B[:, t, hh, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, dim=1), h


@pytest.mark.parametrize("length,chunk", [(11, 4), (8, 8), (5, 16), (1, 4)])
def test_chunked_scan_matches_recurrence(length, chunk):
    torch.manual_seed(length)
    b, H, p, n = 2, 3, 4, 5
    x, B, C = torch.randn(b, length, H, p), torch.randn(b, length, H, n), torch.randn(b, length, H, n)
    dt, A = torch.rand(b, length, H) * 0.5, -torch.rand(H) * 3
    h0 = torch.randn(b, H, p, n)
    y, final = ssd_chunked(x, dt, A, B, C, chunk, h0)
    y_ref, h_ref = recurrence(x, dt, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, h_ref, atol=1e-4, rtol=1e-4)
    y1, _ = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0)
    torch.testing.assert_close(y1, y_ref[:, 0], atol=1e-5, rtol=1e-5)


def test_mixer_conv_and_state_step_by_step():
    torch.manual_seed(0)
    cfg = tiny_config(mamba=MAMBA)
    mixer = build_model(cfg).layers[0].mixer
    assert isinstance(mixer, Mamba)
    x = torch.randn(2, 9, cfg.dim)
    with torch.no_grad():
        full, _ = mixer(x)
        state = mixer.new_state(2, 16, x.dtype, x.device)
        steps = [mixer(x[:, t:t + 1], None, state)[0] for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_pure_mamba_model_cached_and_causal():
    torch.manual_seed(0)
    model = build_model(tiny_config(mamba=MAMBA))
    assert all(isinstance(layer.mixer, Mamba) for layer in model.layers)
    x = tokens(2, 13)
    assert_causal(model, x, t=5)
    assert_cached_matches_full(model, x)


def test_jamba_layout_places_attention_and_moe():
    cfg = tiny_config(depth=8, mamba=MAMBA, moe=dict(num_experts=4, top_k=2),
                      layout=dict(attention_every=4, attention_offset=2, moe_every=2, moe_offset=1))
    model = build_model(cfg)
    mixers = [type(layer.mixer).__name__ for layer in model.layers]
    ffns = [type(layer.ffn).__name__ for layer in model.layers]
    assert mixers == ["Mamba", "Mamba", "Attention", "Mamba", "Mamba", "Mamba", "Attention", "Mamba"]
    assert ffns == ["GatedMLP", "MoE"] * 4
    x = tokens(2, 12)
    assert_causal(model, x, t=4)
    assert_cached_matches_full(model, x)


def test_gradients_reach_every_mamba_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_config(mamba=MAMBA, layout=dict(attention_every=2)))
    assert_all_parameters_learn(model, tokens(4, 16))


def test_tiny_mamba_training_beats_unigram():
    loss, unigram = train_beats_unigram(tiny_config(mamba=MAMBA), steps=40)  # Mamba mixers only
    assert loss < 0.5 * unigram, (loss, unigram)


@pytest.mark.parametrize("extras,match", [
    (dict(mamba=dict(head_dim=7)), "divisible by mamba.head_dim"),
    (dict(mamba=dict(d_state=0)), "d_state"),
    (dict(mamba=dict(dstate=8)), "unknown config key in mamba"),
    (dict(mamba=dict(dt_min=0.5, dt_max=0.1)), "dt_min"),
])
def test_config_errors(extras, match):
    with pytest.raises(ConfigError, match=match):
        build_model(tiny_config(**extras))


@pytest.mark.parametrize("layout,match", [
    (dict(mixer="mamba,atention"), "unknown mixer kind 'atention'"),
    (dict(mixer="mamba*0,attention"), "repeat count"),
    (dict(ffn="dense,,moe"), "empty name"),
])
def test_layout_pattern_errors(layout, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(dict(depth=4, layout=layout))


@pytest.mark.skipif(not torch.cuda.is_available() or mamba_chunk_scan_combined is None,
                    reason="needs CUDA and the mamba_ssm package")
def test_mamba_ssm_kernel_matches_fallback():
    torch.manual_seed(0)
    cfg = tiny_config(dim=64, mamba=dict(d_state=16, head_dim=16, chunk_size=16))
    model = build_model(cfg, device="cuda")
    x = tokens(2, 40).cuda()
    with torch.no_grad():
        fast = model(x)
        for m in model.modules():
            if isinstance(m, Mamba):
                m.mcfg.use_kernels = False
        slow = model(x)
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=1e-3)
