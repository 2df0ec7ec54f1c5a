"""Checks shared by the architecture tests (BitNet, MoE, MoA, MoD, Mamba): causality,
cached decoding against the full forward, gradient reach, and a tiny training run against
the unigram baseline. Everything runs on tiny CPU configs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from andromeda.model import ModelConfig, build_model

VOCAB = 32


def tiny_config(depth: int = 2, dim: int = 32, heads: int = 4, kv_heads: int = 2, **extras) -> ModelConfig:
    """Families given in the version-1 `extras` form (its layout rules: MoE on every layer,
    Mixture-of-Depths on odd blocks, Mamba everywhere unless `layout` says otherwise), converted
    by the config's own upgrade path."""
    return ModelConfig.from_dict(dict(vocab_size=VOCAB, max_seq_len=64, dim=dim, depth=depth,
                                      attention=dict(heads=heads, kv_heads=kv_heads), position=dict(kind="rope"),
                                      norm=dict(kind="rms"), mlp=dict(kind="swiglu", multiple_of=16), extras=extras))


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def assert_causal(model, x: torch.Tensor, t: int) -> None:
    """Changing tokens after position t must not change logits at positions <= t."""
    model.eval()
    y = model(x)
    x2 = x.clone()
    x2[:, t + 1:] = (x2[:, t + 1:] + 7) % VOCAB
    y2 = model(x2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:]), "later logits should see the change"


@torch.no_grad()
def assert_cached_matches_full(model, x: torch.Tensor, prefill: int = 5, chunk: int = 3) -> None:
    """Eval mode: a prefill, a multi-token chunk, then one token at a time == one full pass."""
    model.eval()
    full = model(x)
    B, L = x.shape
    cache = model.new_cache(B, L + 4)
    outs = [model(x[:, :prefill], cache=cache, start_pos=0)]
    outs.append(model(x[:, prefill:prefill + chunk], cache=cache, start_pos=prefill))
    for t in range(prefill + chunk, L):
        outs.append(model(x[:, t:t + 1], cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=2e-5, rtol=2e-5)


def total_loss(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x[:, :-1], with_aux=True)
    logits = out.logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    aux = out.aux_losses
    return loss + sum(aux.values()) if aux else loss


def assert_all_parameters_learn(model, x: torch.Tensor, skip: tuple = ()) -> None:
    """Every trainable parameter gets a finite, non-zero gradient from one training step."""
    model.train()
    model.zero_grad()
    total_loss(model, x).backward()
    for name, p in model.named_parameters():
        if any(s in name for s in skip):
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def pattern_batch(batch: int, length: int, gen: torch.Generator, n_symbols: int = 16) -> torch.Tensor:
    """Sequences that count up by 3 modulo n_symbols from a random start: every symbol is
    equally frequent (unigram entropy log n_symbols) but the next one is determined by the
    current one."""
    start = torch.randint(0, n_symbols, (batch, 1), generator=gen)
    return (start + 3 * torch.arange(length)) % n_symbols


def train_beats_unigram(cfg: ModelConfig, steps: int = 40, lr: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """Train a few dozen steps on the counting pattern; return (eval loss, unigram entropy)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = pattern_batch(8, 24, gen)
        opt.zero_grad()
        total_loss(model, x).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x = pattern_batch(16, 24, gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    return loss, math.log(16)
