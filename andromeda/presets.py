"""Named model configurations, as plain data (nested dicts of ModelConfig fields).

`get_preset(name)` returns a validated ModelConfig; `PRESETS` maps name -> (description, dict).
`preset_training(name)` gives the training settings that suit the preset's size (`train`
uses them under the user's own `--set train.*`): the peak learning rate falls with the width,
as in the published recipes (nanoGPT's baby GPT 1e-3 at 384, GPT-2 small 6e-4 at 768, Llama
3e-4 at 2048-4096, 1.5e-4 beyond); the CPU-sized presets (width 64) learn fastest at 3e-3
(llama-tiny on character-level Tiny Shakespeare, 300 steps: val loss 3.02 at 3e-4, 2.01 at 3e-3,
2.18 at 1e-2).
Sizes of the Andromeda family follow the spec's configs (dim_head 128, two KV heads, ALiBi
on part of the heads plus xPos, QK-norm with a learned per-dim scale); x-transformers'
defaults fill what the spec leaves out (LayerNorm, pre-norm, GELU FFN of 4x width), without its
legacy biases, skip gains and value rotation, like `andromeda-nobias`. `andromeda` itself is the
spec's base model exactly as x-transformers 1.16 builds it (docs/model.md).
"""

from __future__ import annotations

import copy

from andromeda.errors import UserError
from andromeda.model.config import ModelConfig


def _andromeda_size(vocab: int, seq: int, dim: int, depth: int, heads: int, alibi: int) -> dict:
    return dict(vocab_size=vocab, max_seq_len=seq, dim=dim, depth=depth,
                attention=dict(heads=heads, kv_heads=2, head_dim=128, qk_norm="layer", qk_norm_dim_scale=True),
                position=dict(kind="xpos", alibi_heads=alibi),
                norm=dict(kind="layer", placement="pre"), mlp=dict(kind="gelu"))


# The spec's model, as x-transformers 1.16 builds `TransformerWrapper(num_tokens=64007,
# max_seq_len=8192, use_abs_pos_emb=False, attn_layers=Decoder(dim=512, depth=6, heads=8,
# alibi_pos_bias=True, alibi_num_heads=4, rotary_xpos=True, attn_flash=True, deepnorm=True,
# shift_tokens=1, attn_one_kv_head=True))`: same parameters (81,762,823) and, with its weights
# imported, the same logits (tests/test_xtransformers.py). What x-transformers adds to the spec's
# list: biases in LayerNorm, FFN (GELU, 4x) and logits; a learned skip gain under DeepNorm's alpha;
# rotary/xPos on 32 of the 64 channels of each head (max(head_dim / 2, 32)), values included. The
# values' xPos centre is fixed where x-transformers puts it on 8192-token calls (its training
# length), so the model is causal; x-transformers moves it with each call's length.
ANDROMEDA = dict(
    vocab_size=64007, max_seq_len=8192, dim=512, depth=6, head_bias=True,
    attention=dict(heads=8, kv_heads=1),
    position=dict(kind="xpos", rope_dim=32, xpos_scale_base=512.0, alibi_heads=4, rotate_values=True),
    norm=dict(kind="layer", placement="deepnorm", bias=True),
    mlp=dict(kind="gelu", bias=True),
    block=dict(shift_tokens=1, residual_gain=True),
)

# The same shape without x-transformers' legacy details (no biases, no skip gain, rotary over the
# whole head, values not rotated): built like the andromeda-1b ... 15b family, so it is that
# family's small end for scaling comparisons (docs/model.md).
ANDROMEDA_NOBIAS = dict(
    vocab_size=64007, max_seq_len=8192, dim=512, depth=6,
    attention=dict(heads=8, kv_heads=1),
    position=dict(kind="xpos", alibi_heads=4),
    norm=dict(kind="layer", placement="deepnorm"),
    mlp=dict(kind="gelu"),
    block=dict(shift_tokens=1),
)

LLAMA_1B = dict(  # Llama 3.2 1B shape
    vocab_size=128256, max_seq_len=8192, dim=2048, depth=16, tie_embeddings=False,
    attention=dict(heads=32, kv_heads=8),
    position=dict(kind="rope", rope_theta=500000.0),
    norm=dict(kind="rms", placement="pre", eps=1e-5),
    mlp=dict(kind="swiglu", hidden_dim=8192),
)

GPT2 = dict(  # GPT-2 small (124M): learned positions, LayerNorm with bias, GELU MLP with bias
    vocab_size=50304, max_seq_len=1024, dim=768, depth=12, tie_embeddings=True,
    attention=dict(heads=12, bias=True),
    position=dict(kind="learned"),
    norm=dict(kind="layer", bias=True),
    mlp=dict(kind="gelu", bias=True),
)

OPTIMUS_PRIME = dict(
    vocab_size=50257, max_seq_len=2048, dim=1024, depth=8,
    attention=dict(heads=8, kv_heads=2),
    position=dict(kind="rope"),
    norm=dict(kind="rms"),
    mlp=dict(kind="swiglu"),
    block=dict(checkpoint_activations=True),
)

MINIMAL_SOTA = dict(  # Mistral-style baseline with parallel blocks
    vocab_size=32000, max_seq_len=8192, dim=1024, depth=16,
    attention=dict(heads=16, kv_heads=4, bias=False, dropout=0.0),
    position=dict(kind="rope", rope_scaling="linear", rope_factor=2.0),
    norm=dict(kind="rms", placement="pre"),
    mlp=dict(kind="swiglu", multiple_of=256),
    block=dict(parallel=True),
)


def _tiny(base: dict, **changes) -> dict:
    """A CPU-sized variant of `base`: same architecture, small widths."""
    cfg = copy.deepcopy(base)
    att = cfg["attention"]
    head_dim = att.get("head_dim") or cfg["dim"] // att["heads"]
    cfg.update(vocab_size=288, max_seq_len=256, dim=64, depth=2)  # 288 >= 257 byte ids
    kv = att.get("kv_heads") or att["heads"]
    if kv == 1:
        tiny_kv = 1  # multi-query stays multi-query
    elif kv < att["heads"]:
        tiny_kv = 2  # grouped-query stays grouped
    else:
        tiny_kv = 4
    att.update(heads=4, kv_heads=tiny_kv)
    att.pop("head_dim", None)
    if cfg.get("position", {}).get("rope_dim"):  # partial rotary keeps its share of the head
        cfg["position"]["rope_dim"] = cfg["position"]["rope_dim"] * (64 // 4) // head_dim
    if cfg.get("position", {}).get("alibi_heads", 0) > 0:
        cfg["position"]["alibi_heads"] = 2
    cfg.get("mlp", {}).pop("hidden_dim", None)
    cfg.get("mlp", {}).update(multiple_of=16)
    for key, value in changes.items():
        cfg[key] = value
    return cfg


PRESETS: dict[str, tuple[str, dict]] = {
    "andromeda": ("the spec's model as x-transformers 1.16 builds it: ALiBi on 4 heads + xPos, DeepNorm, "
                  "token shift, multi-query", ANDROMEDA),
    "andromeda-nobias": ("andromeda without x-transformers' biases, skip gains and value rotation", ANDROMEDA_NOBIAS),
    "andromeda-1b": ("Andromeda size family, 1B", _andromeda_size(25000, 4192, 2048, 16, 8, 4)),
    "andromeda-3b": ("Andromeda size family, 3B", _andromeda_size(50432, 8192, 3072, 24, 12, 6)),
    "andromeda-7b": ("Andromeda size family, 7B", _andromeda_size(50432, 8192, 4096, 32, 16, 8)),
    "andromeda-10b": ("Andromeda size family, 10B", _andromeda_size(50432, 8192, 5120, 32, 20, 4)),
    "andromeda-15b": ("Andromeda size family, 15B", _andromeda_size(50432, 8192, 6144, 40, 24, 4)),
    "optimus-prime": ("GQA, RoPE, SwiGLU, RMSNorm, activation checkpointing", OPTIMUS_PRIME),
    "minimal-sota": ("Mistral-style: RMSNorm, RoPE with interpolation, SwiGLU, parallel blocks, GQA", MINIMAL_SOTA),
    "llama": ("Llama 3.2 1B shape, for decode benchmarks against peers", LLAMA_1B),
    "gpt2": ("GPT-2 small (124M) shape, for training benchmarks against nanoGPT", GPT2),
    "andromeda-tiny": ("CPU-sized andromeda", _tiny(ANDROMEDA)),
    "optimus-prime-tiny": ("CPU-sized optimus-prime", _tiny(OPTIMUS_PRIME)),
    "minimal-sota-tiny": ("CPU-sized minimal-sota", _tiny(MINIMAL_SOTA)),
    "llama-tiny": ("CPU-sized llama", _tiny(LLAMA_1B)),
    "gpt2-tiny": ("CPU-sized gpt2", _tiny(GPT2)),
    # nanoGPT's "baby GPT" for Tiny Shakespeare (6x384, ctx 256), character vocabulary (65) plus end-of-text.
    "shakespeare-char": ("6x384 char-level model (nanoGPT baby GPT size) with RoPE/SwiGLU/RMSNorm", dict(
        vocab_size=66, max_seq_len=256, dim=384, depth=6,  # 65 characters + end-of-text
        attention=dict(heads=6), position=dict(kind="rope"), norm=dict(kind="rms"),
        mlp=dict(kind="swiglu", dropout=0.2), embed_dropout=0.2, block=dict(residual_dropout=0.0))),
}


# --- Efficient architectures (andromeda.model.{moe,moa,mod,mamba,bitlinear}; docs/architectures.md)

def _llama_base(vocab: int, seq: int, dim: int, depth: int, heads: int, kv: int, **sections) -> dict:
    return dict(vocab_size=vocab, max_seq_len=seq, dim=dim, depth=depth,
                attention=dict(heads=heads, kv_heads=kv), position=dict(kind="rope"),
                norm=dict(kind="rms", placement="pre"), mlp=dict(kind="swiglu"), **sections)


def _anemone(tiny: bool, linear: dict) -> dict:
    """Jamba layout (Mamba mixers, attention 1 in 8 -> here Mixture of Attention Heads, MoE
    every other layer), Mixture-of-Depths around the odd blocks, BitLinear per `linear`.

    MoD skips block 0 and the attention blocks (even offsets): at block 0 the causal routing
    predictor sees only the token itself and cannot learn the top-k decisions, so inference
    skipped that block almost always (benchmarks/arch_compare.md: val loss 1.801 with MoD on
    even blocks, 1.738 on odd blocks, tiny anemone-bf16 on Tiny Shakespeare)."""
    if tiny:
        base = _llama_base(288, 256, 64, 4, 4, 2)
        sections = dict(layout=dict(mixer="mamba,mamba,moa,mamba", ffn="dense,moe", routing="none,mod"),
                        mamba=dict(d_state=16, head_dim=16, chunk_size=32), moe=dict(num_experts=4, top_k=2),
                        moa=dict(num_experts=4, top_k=2), mod=dict(capacity=0.25, predictor_hidden=16))
    else:
        base = _llama_base(32000, 4096, 1024, 16, 16, 4)
        sections = dict(layout=dict(mixer="mamba*4,moa,mamba*3", ffn="dense,moe", routing="none,mod"),
                        mamba=dict(d_state=64, head_dim=64), moe=dict(num_experts=16, top_k=2),
                        moa=dict(num_experts=8, top_k=2), mod=dict(capacity=0.125))
    if linear:
        sections["linear"] = dict(linear)
    base.update(sections)
    return base


def _jamba(tiny: bool) -> dict:
    """Jamba v0.1 shape (Lieber et al. 2024): 1 attention layer in 8, MoE (16 experts, top-2)
    every other layer; Mamba-2 mixers stand in for Mamba-1."""
    if tiny:
        return _llama_base(288, 256, 64, 4, 4, 2, layout=dict(mixer="mamba,mamba,attention,mamba", ffn="dense,moe"),
                           mamba=dict(d_state=16, head_dim=16, chunk_size=32), moe=dict(num_experts=4, top_k=2))
    cfg = _llama_base(65536, 8192, 4096, 32, 32, 8, layout=dict(mixer="mamba*4,attention,mamba*3", ffn="dense,moe"),
                      mamba=dict(d_state=16, head_dim=64), moe=dict(num_experts=16, top_k=2))
    cfg["mlp"]["hidden_dim"] = 14336
    cfg["position"] = dict(kind="none")  # Jamba's attention layers use no positional encoding
    return cfg


def _moe(tiny: bool) -> dict:
    """Mixtral-style decoder: every FFN is 8 experts, top-2."""
    if tiny:
        return _llama_base(288, 256, 64, 2, 4, 2, layout=dict(ffn="moe"), moe=dict(num_experts=4, top_k=2))
    return _llama_base(32000, 4096, 1024, 16, 16, 4, layout=dict(ffn="moe"), moe=dict(num_experts=8, top_k=2))


def _bitnet(tiny: bool) -> dict:
    """BitNet b1.58 (Ma et al. 2024), 700M shape: every attention and MLP projection ternary;
    embeddings and the output head stay in full precision, as in the paper."""
    linear = dict(attention="bitnet", mlp="bitnet")
    if tiny:
        return _llama_base(288, 256, 64, 2, 4, 4, linear=linear)
    return _llama_base(32000, 2048, 1536, 24, 24, 24, linear=linear)


_ALL_BITNET = dict(attention="bitnet", mlp="bitnet", mixer="bitnet", router="bitnet")
_BITNET_BUT_ATTENTION = dict(mlp="bitnet", mixer="bitnet")
_BITNET_FFN_ONLY = dict(mlp="bitnet")

PRESETS.update({
    "anemone": ("Jamba layout + MoE + MoD + MoA, BitLinear b1.58 in MLP/experts and Mamba (attention dense)",
                _anemone(False, _BITNET_BUT_ATTENTION)),
    "anemone-bf16": ("anemone without BitLinear (all projections dense)", _anemone(False, {})),
    "anemone-1.58": ("anemone with every projection 1.58-bit (attention, MLP, Mamba, routers)",
                     _anemone(False, _ALL_BITNET)),
    "anemone-1.58-ffn": ("anemone with 1.58-bit MLP/experts only (attention and Mamba dense)",
                         _anemone(False, _BITNET_FFN_ONLY)),
    "jamba": ("Jamba v0.1 shape: Mamba + attention 1:7, MoE 16x top-2 every other layer", _jamba(False)),
    "moe": ("Mixtral-style MoE decoder, 8 experts top-2", _moe(False)),
    "bitnet": ("BitNet b1.58 700M shape: ternary attention and MLP", _bitnet(False)),
    "anemone-tiny": ("CPU-sized anemone", _anemone(True, _BITNET_BUT_ATTENTION)),
    "anemone-bf16-tiny": ("CPU-sized anemone-bf16", _anemone(True, {})),
    "anemone-1.58-tiny": ("CPU-sized anemone-1.58", _anemone(True, _ALL_BITNET)),
    "anemone-1.58-ffn-tiny": ("CPU-sized anemone-1.58-ffn", _anemone(True, _BITNET_FFN_ONLY)),
    "jamba-tiny": ("CPU-sized jamba", _jamba(True)),
    "moe-tiny": ("CPU-sized moe", _moe(True)),
    "bitnet-tiny": ("CPU-sized bitnet", _bitnet(True)),
})


# (largest width, training settings), first match wins.
TRAINING_BY_WIDTH: list[tuple[int, dict]] = [
    (128, dict(lr=3e-3)),
    (512, dict(lr=1e-3)),
    (1024, dict(lr=6e-4)),
    (4096, dict(lr=3e-4)),
    (1 << 30, dict(lr=1.5e-4)),
]

# Presets whose recipe is known beyond the width rule.
TRAINING_OVERRIDES: dict[str, dict] = {
    # nanoGPT's config/train_shakespeare_char.py: batch 64 x 256, lr 1e-3 to 1e-4, beta2 0.99, 100 warmup steps of 5000
    "shakespeare-char": dict(lr=1e-3, min_lr_ratio=0.1, beta2=0.99, warmup_frac=0.02, batch_size=64),
}


def preset_training(name: str) -> dict:
    """Training settings (TrainConfig fields) that suit the preset's size."""
    width = preset_dict(name)["dim"]
    settings = next(dict(values) for limit, values in TRAINING_BY_WIDTH if width <= limit)
    settings.update(TRAINING_OVERRIDES.get(name, {}))
    return settings


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; run `andromeda presets` to list them")
    return ModelConfig.from_dict(copy.deepcopy(PRESETS[name][1]))


def preset_dict(name: str) -> dict:
    get_preset(name)  # validates the name
    return copy.deepcopy(PRESETS[name][1])
