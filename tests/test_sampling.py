"""Sampling functions against their direct definitions, and the statistics of `sample`."""

import pytest
import torch

from andromeda.errors import UserError
from andromeda.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    make_generators,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)


def random_logits(rows=6, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2


def kept(filtered):
    return torch.isfinite(filtered)


def test_top_k_keeps_the_k_largest():
    logits = random_logits()
    for k in (1, 3, 17):
        mask = kept(top_k_filter(logits, k))
        for row, m in zip(logits, mask):
            expected = set(torch.argsort(row, descending=True)[:k].tolist())
            assert set(torch.nonzero(m).flatten().tolist()) == expected
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 1000), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = random_logits(rows=20, vocab=30)
    for p in (0.05, 0.3, 0.5, 0.9, 0.999):
        mask = kept(top_p_filter(logits, p))
        for row, m in zip(logits, mask):
            probs = torch.softmax(row.double(), -1)
            order = torch.argsort(probs, descending=True)
            # Direct definition: the smallest prefix of the ranking with mass >= p.
            total, size = 0.0, 0
            while total < p:
                total += probs[order[size]].item()
                size += 1
            assert set(torch.nonzero(m).flatten().tolist()) == set(order[:size].tolist()), p
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    logits = random_logits()
    for min_p in (0.01, 0.2, 0.7, 1.0):
        mask = kept(min_p_filter(logits, min_p))
        probs = torch.softmax(logits, -1)
        expected = probs >= min_p * probs.max(-1, keepdim=True).values
        assert torch.equal(mask, expected)


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_pipeline_matches_hand_composition():
    logits = random_logits()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, :5] = True
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    x = apply_repetition_penalty(logits, seen, 1.3) / 0.7
    x = min_p_filter(top_p_filter(top_k_filter(x, 20), 0.8), 0.05)
    assert torch.allclose(logits_to_probs(logits, params, seen), torch.softmax(x, -1))


def test_temperature_zero_is_argmax_one_hot():
    logits = random_logits()
    probs = logits_to_probs(logits, SamplingParams(temperature=0))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(len(logits)))


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 20000
    torch.manual_seed(0)
    draws = sample(probs.expand(n, -1).clone())
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[4] == 0  # a zero-probability token is never drawn
    # Each frequency within 5 standard errors of its probability.
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), freq


def test_seeded_rows_are_deterministic_and_independent_of_the_batch():
    probs = torch.softmax(random_logits(rows=3, vocab=100), -1)
    a = [sample(probs, make_generators(7, 3, "cpu")) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    # Row 0 alone with seed 7 draws what row 0 of the batch drew.
    alone = sample(probs[:1], make_generators(7, 1, "cpu"))
    assert alone.item() == a[0][0].item()
    draws = torch.stack([sample(probs, make_generators(s, 3, "cpu")) for s in range(30)])
    assert len(set(draws[:, 0].tolist())) > 1  # different seeds, different draws


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature"), ("top_p", 0.0, "top-p"), ("top_p", 1.5, "top-p"),
    ("max_new_tokens", 0, "max new tokens"), ("min_p", -0.1, "min-p"), ("repetition_penalty", 0.0, "penalty"),
    ("top_k", -1, "top-k"), ("temperature", float("nan"), "temperature"), ("stop", [""], "stop")])
def test_bad_parameters_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**{field: value})
