"""Mixture-of-Depths: top-k capacity routing in training, the causal predictor rule in eval
and cached decoding, gradients to router and predictor, a tiny training run, the anemone
presets that combine every family, and config validation."""

import math

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
from andromeda.model.mod import MixtureOfDepths
from andromeda.model.state import Context, Positions
from andromeda.presets import get_preset

EVERY_BLOCK = dict(mod_every=1, mod_offset=0)


def _context(model, L):
    pos = Positions.make(0, L, "cpu")
    return Context(pos, model.rotary(pos.ids, torch.float32))


def test_training_routes_top_capacity_tokens_and_scales_by_router():
    torch.manual_seed(0)
    model = build_model(tiny_config(mod=dict(capacity=0.25), layout=EVERY_BLOCK)).train()
    layer = model.layers[0]
    assert isinstance(layer.route, MixtureOfDepths)
    B, L, D = 2, 12, model.cfg.dim
    x = torch.randn(B, L, D)
    with torch.no_grad():
        out, _ = layer(x, _context(model, L))
        C = math.ceil(0.25 * L)
        logits = layer.route.router(x).squeeze(-1)
        for b in range(B):
            idx = logits[b].topk(C).indices.sort().values
            skipped = torch.ones(L, dtype=torch.bool)
            skipped[idx] = False
            assert torch.equal(out[b, skipped], x[b, skipped])  # skipped tokens ride the residual
            sub = x[b:b + 1, idx]
            inner, _ = layer.body(sub, _context(model, C), None)  # the block sees a contiguous short sequence
            expected = sub + torch.sigmoid(logits[b, idx])[None, :, None] * (inner - sub)
            torch.testing.assert_close(out[b:b + 1, idx], expected, atol=1e-5, rtol=1e-5)


def test_predictor_gets_bce_loss_on_topk_decisions():
    torch.manual_seed(0)
    model = build_model(tiny_config(depth=1, mod=dict(capacity=0.5, predictor_loss_weight=2.0), layout=EVERY_BLOCK))
    model.train()
    x = tokens(2, 10)
    out = model(x, with_aux=True)
    # Reference: BCE of the predictor on the block input against the router's top-5 mask.
    h = model.embed(x)
    route = model.layers[0].route
    chosen = torch.zeros(2, 10)
    chosen.scatter_(1, route.router(h).squeeze(-1).topk(5, dim=-1).indices, 1.0)
    p = torch.sigmoid(route.predictor(h).squeeze(-1))
    bce0 = -(chosen * p.log() + (1 - chosen) * (1 - p).log()).mean()
    torch.testing.assert_close(out.aux_losses["mod_predictor"], 2.0 * bce0)


def test_eval_is_causal_and_cached_decoding_matches_with_uneven_rows():
    torch.manual_seed(0)
    model = build_model(tiny_config(depth=3, mod=dict(capacity=0.25), layout=EVERY_BLOCK))
    x = tokens(3, 14)
    model.eval()
    with torch.no_grad():
        stats = model(x, with_aux=True).stats
    fractions = [v.item() for k, v in stats.items() if k.startswith("mod_fraction")]
    assert any(0.0 < f < 1.0 for f in fractions), fractions  # some tokens routed, some skipped
    assert_causal(model, x, t=6)
    assert_cached_matches_full(model, x)


def test_batched_eval_equals_each_row_alone():
    """The uncached eval forward pads rows with different routed counts into one block call;
    every row must come out as if it ran alone."""
    torch.manual_seed(0)
    model = build_model(tiny_config(depth=3, mod=dict(capacity=0.25), layout=EVERY_BLOCK)).eval()
    x = tokens(4, 14, seed=3)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[b:b + 1]) for b in range(4)])
    routed = [int((model.layers[0].route.predictor(model.embed(x[b])).squeeze(-1) > 0).sum()) for b in range(4)]
    assert len(set(routed)) > 1, routed  # the rows really need different padding
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_gradients_reach_router_predictor_and_block():
    torch.manual_seed(0)
    model = build_model(tiny_config(mod=dict(capacity=0.5), layout=EVERY_BLOCK))
    assert_all_parameters_learn(model, tokens(4, 16))


def test_tiny_mod_training_beats_unigram():
    cfg = tiny_config(depth=2, mod=dict(capacity=0.5))  # every other block routed
    loss, unigram = train_beats_unigram(cfg, steps=40)
    assert loss < 0.5 * unigram, (loss, unigram)


@pytest.mark.parametrize("name", ["anemone-tiny", "anemone-bf16-tiny", "anemone-1.58-tiny", "jamba-tiny"])
def test_anemone_presets_are_causal_and_cache_exactly(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    assert_causal(model, x, t=5)
    assert_cached_matches_full(model, x)


@pytest.mark.parametrize("extras,match", [
    (dict(mod=dict(capacity=0)), "capacity"),
    (dict(mod=dict(capacity=1.5)), "capacity"),
    (dict(mod=dict(predictor_hidden=-1)), "predictor_hidden"),
    (dict(mod=dict(capcity=0.5)), "unknown config key in mod"),
])
def test_config_errors(extras, match):
    with pytest.raises(ConfigError, match=match):
        build_model(tiny_config(**extras))


def test_post_norm_is_refused():
    with pytest.raises(ConfigError, match="placement='pre'"):
        ModelConfig.from_dict(dict(depth=2, norm=dict(placement="post"), layout=dict(routing="none,mod")))


def routed_per_row(model, x) -> list[list[int]]:
    """For each Mixture-of-Depths layer, how many tokens of each row its block changed: a
    token the router skips passes the layer unchanged, so this counts what was routed."""
    counts, hooks = [], []
    for layer in model.layers:
        if layer.route is not None:
            hooks.append(layer.route.register_forward_hook(
                lambda mod, args, out: counts.append((out[0] != args[0]).any(-1).sum(-1).tolist())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def test_anemone_checkpoint_roundtrip_keeps_logits_and_routing(tmp_path):
    from andromeda.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model(get_preset("anemone-tiny")).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # Training routes exactly ceil(capacity * L) tokens per row through each MoD block:
    # 0.25 of 16 here, so a router that skipped every token or routed all of them fails.
    assert loaded.cfg.mod.capacity == 0.25
    expected = [[4, 4], [4, 4]]  # two MoD layers x two rows
    assert routed_per_row(loaded.train(), x) == expected == routed_per_row(model.train(), x)
    # Inference routes by the predictor, token by token: the same tokens before and after.
    assert routed_per_row(loaded.eval(), x) == routed_per_row(model.eval(), x)


def test_activation_checkpointing_counts_aux_losses_once():
    """The backward pass recomputes checkpointed blocks; their auxiliary losses and routing
    statistics must still be those of the one forward pass, with the same gradients."""
    import dataclasses
    torch.manual_seed(0)
    cfg = tiny_config(moe=dict(num_experts=4, top_k=2), mod=dict(capacity=0.5), layout=EVERY_BLOCK)
    plain = build_model(cfg).train()
    ckpt_cfg = dataclasses.replace(cfg, block=dataclasses.replace(cfg.block, checkpoint_activations=True))
    ckpt = build_model(ckpt_cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    x = tokens(2, 16)
    reported = []
    for model in (plain, ckpt):
        out = model(x, with_aux=True)
        aux = dict(out.aux_losses)
        (out.logits.logsumexp(-1).mean() + sum(aux.values())).backward()
        after = {k: v.item() for k, v in out.aux_losses.items()}
        assert after == {k: v.item() for k, v in aux.items()}, "backward changed the reported losses"
        reported.append((after, {k: v.clone() for k, v in out.stats.items()}))
    assert set(reported[0][0]) == {"moe_balance", "moe_z", "mod_predictor"}
    assert reported[0][0] == pytest.approx(reported[1][0], rel=1e-6)
    assert reported[0][1].keys() == reported[1][1].keys()
    for key, value in reported[0][1].items():
        torch.testing.assert_close(value, reported[1][1][key])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
