"""Mixture-of-Experts FFN: the sorted/grouped dispatch against a per-token reference, the
auxiliary losses against their formulas, active-parameter counts, cached decoding,
gradients, a tiny training run, and config validation."""

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
from andromeda.model import build_model, count_parameters
from andromeda.model.moe import MoE, grouped_matmul
from andromeda.presets import get_preset


def reference_moe(moe: MoE, x: torch.Tensor, capacity=None) -> torch.Tensor:
    """Token by token: softmax over experts, top-k, renormalised gates, sum of gated SwiGLU
    experts (plus the shared expert). With `capacity`, each expert serves only its first
    `capacity` assignments in token order."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.softmax(moe.router.proj(flat).float(), dim=-1)
    out = torch.zeros_like(flat)
    served = [0] * moe.mcfg.num_experts
    for n in range(flat.shape[0]):
        top_p, top_i = probs[n].topk(moe.mcfg.top_k)
        top_p = top_p / top_p.sum()
        for p, e in zip(top_p, top_i.tolist()):
            served[e] += 1
            if capacity is not None and served[e] > capacity:
                continue
            gate, up = (flat[n] @ moe.w_in[e]).chunk(2)
            out[n] += p * ((F.silu(gate) * up) @ moe.w_out[e])
    if moe.shared is not None:
        out = out + moe.shared(flat)[0]
    return out.view_as(x)


@pytest.mark.parametrize("shared", [False, True])
def test_dispatch_matches_per_token_reference(shared):
    torch.manual_seed(0)
    cfg = tiny_config(moe=dict(num_experts=4, top_k=2, shared_expert=shared))
    moe = build_model(cfg).layers[0].ffn
    x = torch.randn(2, 7, cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], reference_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_capacity_drops_late_assignments():
    torch.manual_seed(1)
    cfg = tiny_config(moe=dict(num_experts=4, top_k=1, capacity_factor=0.5))
    moe = build_model(cfg).layers[0].ffn
    x = torch.randn(1, 16, cfg.dim)
    capacity = moe._capacity(16)
    assert capacity == 2  # 0.5 * 16 tokens * 1 / 4 experts
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], reference_moe(moe, x, capacity), atol=1e-5, rtol=1e-5)


def test_aux_losses_follow_switch_and_st_moe_formulas():
    torch.manual_seed(0)
    cfg = tiny_config(moe=dict(num_experts=4, top_k=2, balance_loss_weight=0.5, z_loss_weight=0.25))
    moe = build_model(cfg).layers[0].ffn.train()
    x = torch.randn(3, 5, cfg.dim)
    _, ctx = moe(x)
    logits = moe.router.proj(x.reshape(-1, cfg.dim)).float()
    probs = logits.softmax(-1)
    chosen = F.one_hot(probs.topk(2, dim=-1).indices, 4).sum(1).float()  # (N, E)
    f = chosen.sum(0) / chosen.sum()
    balance = 4 * (f * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(ctx.losses["moe_balance"], 0.5 * balance)
    torch.testing.assert_close(ctx.losses["moe_z"], 0.25 * z)
    load = ctx.stats["moe_load/layer0"]
    torch.testing.assert_close(load, f)
    assert load.sum().item() == pytest.approx(1.0)


def test_balance_loss_is_one_for_uniform_routing():
    """With equal router probabilities and equal loads the Switch loss is exactly 1."""
    cfg = tiny_config(moe=dict(num_experts=4, top_k=1, balance_loss_weight=1.0))
    moe = build_model(cfg).layers[0].ffn.train()
    with torch.no_grad():
        moe.router.proj.weight.zero_()
    _, ctx = moe(torch.randn(1, 8, cfg.dim))
    # topk of equal values picks expert 0: f = (1, 0, 0, 0), P = 1/4 each -> E * 1/4 = 1.
    assert ctx.losses["moe_balance"].item() == pytest.approx(1.0)


def test_grouped_matmul_matches_per_row_weights():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 2, 4])
    x, w = torch.randn(9, 5), torch.randn(4, 5, 6)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.einsum("mi,mio->mo", x, w[expert])
    torch.testing.assert_close(grouped_matmul(x, w, counts), ref)


def test_active_parameters_exclude_unrouted_experts():
    cfg = tiny_config(moe=dict(num_experts=4, top_k=2, hidden_dim=48))
    dense_cfg = tiny_config()
    total, active = count_parameters(build_model(cfg, device="meta"))
    per_expert = cfg.dim * 2 * 48 + 48 * cfg.dim
    assert total - active == cfg.depth * (4 - 2) * per_expert
    dense_total, dense_active = count_parameters(build_model(dense_cfg, device="meta"))
    assert dense_total == dense_active
    t, a = count_parameters(build_model(get_preset("moe-tiny"), device="meta"))
    assert a < t


def test_moe_model_causal_and_cached():
    torch.manual_seed(0)
    model = build_model(tiny_config(moe=dict(num_experts=4, top_k=2, shared_expert=True)))
    x = tokens(2, 12)
    assert_causal(model, x, t=5)
    assert_cached_matches_full(model, x)


def test_gradients_reach_router_experts_and_shared_expert():
    torch.manual_seed(0)
    model = build_model(tiny_config(moe=dict(num_experts=4, top_k=2, shared_expert=True)))
    assert_all_parameters_learn(model, tokens(4, 32))


def test_tiny_moe_training_beats_unigram():
    loss, unigram = train_beats_unigram(tiny_config(moe=dict(num_experts=4, top_k=2)), steps=40)
    assert loss < 0.5 * unigram, (loss, unigram)


@pytest.mark.parametrize("moe,match", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(balance_loss_weight=-1), "loss weights"),
    (dict(experts=4), "unknown config key in moe"),
])
def test_config_errors(moe, match):
    with pytest.raises(ConfigError, match=match):
        build_model(tiny_config(moe=moe))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_path_on_gpu_matches_loop():
    torch.manual_seed(0)
    counts = torch.tensor([16, 0, 32, 48], device="cuda")
    x = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    expert = torch.repeat_interleave(torch.arange(4, device="cuda"), counts)
    ref = torch.einsum("mi,mio->mo", x.float(), w[expert].float())
    torch.testing.assert_close(grouped_matmul(x, w, counts).float(), ref, atol=0.1, rtol=0.05)


def test_presets_command_reports_active_below_total(capsys):
    import json

    from andromeda.cli import main

    assert main(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("anemone", "anemone-bf16", "anemone-1.58", "jamba", "moe", "anemone-tiny", "moe-tiny"):
        assert rows[name]["active_params"] < rows[name]["total_params"], name
    assert rows["bitnet"]["active_params"] == rows["bitnet"]["total_params"]
    # Jamba v0.1: 52B total, 12B active (Lieber et al. 2024, table 1).
    assert abs(rows["jamba"]["total_params"] / 1e9 - 52) < 1.0
    assert abs(rows["jamba"]["active_params"] / 1e9 - 12) < 0.5


@pytest.mark.parametrize("bitnet", [False, True])
def test_single_token_path_equals_sorted_dispatch(bitnet):
    """Decoding steps (one token per sequence) gather each token's experts instead of
    sorting; both must give the same output, for MoE and for MoA."""
    from andromeda.model.moa import MixtureOfAttentionHeads
    torch.manual_seed(0)
    linear = dict(mlp="bitnet", attention="bitnet") if bitnet else {}
    cfg = tiny_config(moe=dict(num_experts=4, top_k=2, shared_expert=True), linear=linear)
    moe = next(m for m in build_model(cfg).modules() if isinstance(m, MoE)).eval()
    x = torch.randn(5, 1, cfg.dim)
    with torch.no_grad():
        flat = x.reshape(5, cfg.dim)
        gates, ids, _ = moe.router(flat)
        torch.testing.assert_close(moe._per_token(flat, gates, ids), moe._sorted(flat, gates, ids))
    moa_cfg = tiny_config(moa=dict(num_experts=4, top_k=2), linear=linear)
    model = build_model(moa_cfg).eval()
    assert any(isinstance(m, MixtureOfAttentionHeads) for m in model.modules())
    seq = tokens(3, 6)
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache(3, 8)
        model(seq[:, :5], cache=cache)
        torch.testing.assert_close(model(seq[:, 5:], cache=cache, start_pos=5), full[:, 5:], atol=1e-5, rtol=1e-5)
