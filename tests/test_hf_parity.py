"""Andromeda vs Hugging Face transformers on the same weights.

Tiny random Llama / Mistral / Qwen2 models are built with transformers itself (eager attention,
float32), saved with `save_pretrained` and imported through `andromeda.interop.hf`; logits must
agree to 1e-4. Scaled-RoPE and sliding-window cases also check that the feature matters, i.e.
that dropping it from the imported config breaks the agreement.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from andromeda.errors import UserError  # noqa: E402
from andromeda.interop.hf import config_from_hf, config_to_hf, import_hf  # noqa: E402
from andromeda.model.transformer import Transformer  # noqa: E402

TOL = 1e-4
VOCAB, SEQ = 96, 20
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.15, rms_norm_eps=1e-5)


def make_hf(cls_name: str, seed: int = 0, **overrides):
    """A random transformers model with non-trivial norm weights (so swapped norms would show)."""
    torch.manual_seed(seed)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def convert(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    return import_hf(tmp_path / "hf", with_tokenizer=False).model


def tokens(seed: int = 1, batch: int = 2, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def without(model: Transformer, **position_or_attention) -> Transformer:
    """The same weights under a config with some attention/position fields replaced."""
    cfg = model.cfg
    pos = {k: v for k, v in position_or_attention.items() if hasattr(cfg.position, k)}
    att = {k: v for k, v in position_or_attention.items() if hasattr(cfg.attention, k)}
    new_cfg = dataclasses.replace(cfg, position=dataclasses.replace(cfg.position, **pos),
                                  attention=dataclasses.replace(cfg.attention, **att))
    other = Transformer(new_cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


CASES = {
    "llama_gqa_untied": ("LlamaForCausalLM", {}),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama_mqa_bias": ("LlamaForCausalLM", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "qwen2_qkv_bias": ("Qwen2ForCausalLM", {}),
    "mistral_wide_heads": ("MistralForCausalLM", dict(head_dim=24, sliding_window=None)),  # heads*head_dim != dim
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    cls_name, overrides = CASES[case]
    hf = make_hf(cls_name, **overrides)
    ours = convert(hf, tmp_path)
    x = tokens()
    ref = hf_logits(hf, x)
    assert ref.std() > 0.5  # logits big enough that a 1e-4 agreement means something
    assert max_diff(our_logits(ours, x), ref) < TOL


def test_tied_embeddings_share_one_tensor(tmp_path):
    ours = convert(make_hf("LlamaForCausalLM", tie_word_embeddings=True), tmp_path)
    assert ours.cfg.tie_embeddings and ours.head.weight is ours.embed.weight


ROPE_CASES = {
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("kind", sorted(ROPE_CASES))
def test_scaled_rope_matches_transformers(kind, tmp_path):
    hf = make_hf("LlamaForCausalLM", rope_parameters={**ROPE_CASES[kind], "rope_theta": 10000.0})
    ours = convert(hf, tmp_path)
    assert ours.cfg.position.rope_scaling == kind
    x = tokens(length=24)
    ref = hf_logits(hf, x)
    assert max_diff(our_logits(ours, x), ref) < TOL
    # The scaling is not a no-op on this sequence: plain RoPE gives other logits.
    assert max_diff(our_logits(without(ours, rope_scaling="none", rope_factor=1.0), x), ref) > 1e-2


@pytest.mark.parametrize("kind", ["default", "llama3"])
def test_far_positions_match_transformers(kind, tmp_path):
    """At position ~100k a 1e-7 relative error in the RoPE frequencies turns into visible logit
    differences, so this checks that the frequencies are the same float32 numbers."""
    rope = {"rope_type": "default"} if kind == "default" else {**ROPE_CASES["llama3"],
                                                                "original_max_position_embeddings": 8192}
    hf = make_hf("LlamaForCausalLM", max_position_embeddings=131072, num_attention_heads=1, num_key_value_heads=1,
                 rope_parameters={**rope, "rope_theta": 500000.0})
    ours = convert(hf, tmp_path)
    x = tokens(length=8)
    start = 100_000
    with torch.no_grad():
        ref = hf(x, position_ids=(start + torch.arange(x.shape[1]))[None]).logits
        assert max_diff(ours(x, start_pos=start), ref) < TOL


def test_rope_scaling_spelled_as_transformers_4(tmp_path):
    """config.json written by transformers 4.x: rope_theta at top level and `rope_scaling`."""
    hf = make_hf("LlamaForCausalLM", rope_parameters={**ROPE_CASES["llama3"], "rope_theta": 5000.0})
    old = {k: v for k, v in hf.config.to_dict().items() if k != "rope_parameters"}
    old.update(rope_theta=5000.0, rope_scaling={**ROPE_CASES["llama3"], "type": "llama3"},
               architectures=["LlamaForCausalLM"])
    old["rope_scaling"].pop("rope_type")
    cfg, _ = config_from_hf(old)
    new, _ = config_from_hf(hf.config.to_dict())
    assert cfg.position == new.position and cfg.position.rope_theta == 5000.0


def test_mistral_sliding_window_matches_transformers(tmp_path):
    hf = make_hf("MistralForCausalLM", sliding_window=4)
    ours = convert(hf, tmp_path)
    assert ours.cfg.attention.window == 4
    x = tokens(length=16)  # four times the window
    ref = hf_logits(hf, x)
    assert max_diff(our_logits(ours, x), ref) < TOL
    assert max_diff(our_logits(without(ours, window=None), x), ref) > 1e-2


@pytest.mark.parametrize("cls_name,overrides", [("LlamaForCausalLM", {}),
                                                ("MistralForCausalLM", dict(sliding_window=4))])
def test_cached_decoding_matches_transformers_full_forward(cls_name, overrides, tmp_path):
    hf = make_hf(cls_name, **overrides)
    ours = convert(hf, tmp_path)
    x = tokens(length=14)
    ref = hf_logits(hf, x)
    prefix = 5
    cache = ours.new_cache(batch=x.shape[0], max_len=x.shape[1])
    with torch.no_grad():
        steps = [ours(x[:, :prefix], cache=cache, start_pos=0)]
        for t in range(prefix, x.shape[1]):
            steps.append(ours(x[:, t:t + 1], cache=cache, start_pos=t))
    assert max_diff(torch.cat(steps, dim=1), ref) < TOL


def test_export_config_loads_in_transformers_with_same_logits(tmp_path):
    """config_to_hf inverts config_from_hf for a scaled-RoPE Mistral (the window selects Mistral)."""
    hf = make_hf("MistralForCausalLM", sliding_window=6,
                 rope_parameters={**ROPE_CASES["yarn"], "rope_theta": 10000.0})
    ours = convert(hf, tmp_path)
    exported = config_to_hf(ours.cfg)
    assert exported["architectures"] == ["MistralForCausalLM"]
    again, _ = config_from_hf(exported)
    assert again == ours.cfg


@pytest.mark.parametrize("field,value,message", [
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_type='dynamic'"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope_type='longrope'"),
    ("hidden_act", "gelu_pytorch_tanh", "hidden_act"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
])
def test_unsupported_features_are_refused_by_name(field, value, message):
    hf = {**BASE, "architectures": ["LlamaForCausalLM"], field: value}
    with pytest.raises(UserError, match=message):
        config_from_hf(hf)
