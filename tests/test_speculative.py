"""Speculative decoding: greedy output identical to the target alone (also with token shift,
whose state is rolled back on rejection), and sampled output distributed as the target's
(chi-square test on a fixed-logit toy model, Leviathan et al. 2023 / Chen et al. 2023)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from andromeda.data.tokenizer import ByteTokenizer
from andromeda.infer.cache import ModelCache
from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams, logits_to_probs
from andromeda.infer.speculative import Speculator
from andromeda.model.transformer import Transformer
from andromeda.presets import get_preset

GREEDY = SamplingParams(max_new_tokens=16, temperature=0, stop_at_eos=False)


def tiny(name, seed, max_seq_len=96):
    cfg = get_preset(name)
    cfg.max_seq_len = max_seq_len
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    return model


def perturbed(model, scale, seed):
    """A draft that agrees with the target most of the time but not always."""
    torch.manual_seed(seed)
    draft = Transformer(model.cfg).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.abs().mean() * torch.randn_like(p))
    return draft


@pytest.mark.parametrize("preset", ["llama-tiny", "andromeda-tiny"])
def test_greedy_output_is_the_targets(preset):
    target = tiny(preset, 0)
    prompts = ["speculative decoding", "ab"]
    plain = Engine(target, ByteTokenizer()).generate(prompts, GREEDY)
    rates = []
    for draft in (perturbed(target, 0.05, 1), tiny(preset, 2)):  # close draft, unrelated draft
        for k in (1, 3):
            got = Engine(target, ByteTokenizer(), draft=draft, draft_tokens=k).generate(prompts, GREEDY)
            assert [r.token_ids for r in got] == [r.token_ids for r in plain], (k, preset)
            rates.append(got[0].acceptance_rate)
    # Both accept and reject paths ran: a close draft is accepted often, an unrelated one rarely.
    assert max(rates) > 0.5 and min(rates) < 0.5


def test_acceptance_rate_of_the_target_itself_is_one():
    target = tiny("llama-tiny", 0)
    r = Engine(target, ByteTokenizer(), draft=target).generate(["abc"], GREEDY)[0]
    assert r.acceptance_rate == 1.0 and r.new_tokens == 16


def test_greedy_with_repetition_penalty_and_stop_string_matches_plain():
    target = tiny("llama-tiny", 0)
    draft = perturbed(target, 0.05, 1)
    params = GREEDY.replace(repetition_penalty=1.5, max_new_tokens=20)
    plain = Engine(target, ByteTokenizer()).generate(["hello hello"], params)[0]
    spec = Engine(target, ByteTokenizer(), draft=draft).generate(["hello hello"], params)[0]
    assert spec.token_ids == plain.token_ids
    # The penalty changes this continuation, so a speculator that dropped it could not match
    # (this test had no such check, and despite its name no stop string).
    no_penalty = params.replace(repetition_penalty=1.0)
    assert Engine(target, ByteTokenizer(), draft=draft).generate(["hello hello"], no_penalty)[0].token_ids \
        != plain.token_ids
    # A stop string met in the middle of an accepted run of draft tokens: both stop at the same
    # token, and nothing accepted after it is returned.
    stop = plain.text[8:10]
    params = params.replace(stop=(stop,))
    plain = Engine(target, ByteTokenizer()).generate(["hello hello"], params)[0]
    spec = Engine(target, ByteTokenizer(), draft=draft, draft_tokens=4).generate(["hello hello"], params)[0]
    assert plain.finish_reason == spec.finish_reason == "stop" and stop not in plain.text
    assert spec.text == plain.text and spec.token_ids == plain.token_ids and spec.new_tokens < 20


class Bigram(nn.Module):
    """A toy model whose next-token logits depend only on the last token (a fixed table)."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.cfg = SimpleNamespace(vocab_size=table.shape[0], max_seq_len=64)

    def new_cache(self, batch, max_len, device=None):
        return ModelCache([], max_len=max_len, batch=batch)

    def forward(self, tokens, cache=None, start_pos=0, last_only=False):
        out = self.table[tokens]
        return out[:, -1:] if last_only else out


def chi_square_critical(df, z=3.09):  # upper 0.1% point, Wilson-Hilferty approximation
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def joint_probs(table, params, first, n):
    """Exact distribution of n tokens generated after `first` under the (processed) table."""
    step = logits_to_probs(table, params)  # (V, V): row = previous token
    probs = step[first]
    for _ in range(n - 1):
        probs = probs[..., None] * step  # P(..., t_k) = P(..., t_{k-1}) * step[t_{k-1}, t_k]
    return probs.flatten()


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    return (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item(), int(keep.sum()) - 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3)])
def test_sampled_output_follows_the_target_distribution(params):
    V, n_tokens, runs = 4, 3, 2500
    g = torch.Generator().manual_seed(0)
    target_table = torch.randn(V, V, generator=g) * 1.5
    draft_table = torch.randn(V, V, generator=g) * 1.5  # a poor draft: many rejections
    target, draft = Bigram(target_table), Bigram(draft_table)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V ** n_tokens)
    accepted = proposed = 0
    for _ in range(runs):
        spec = Speculator(target, draft, params, k=3, device="cpu", generator=gen, max_len=32)
        out = [spec.start([0])]
        while len(out) < n_tokens:
            out += spec.step(8)
        index = 0
        for t in out[:n_tokens]:
            index = index * V + t
        counts[index] += 1
        accepted, proposed = accepted + spec.accepted, proposed + spec.proposed
    assert 0 < accepted < proposed  # both paths of the rejection scheme ran

    probs = joint_probs(target_table, params, 0, n_tokens)
    assert counts[probs == 0].sum() == 0  # nothing outside the target's support
    stat, df = chi_square(counts, probs)
    assert stat < chi_square_critical(df), (stat, df)
    # The same test rejects the draft's own distribution, so it has the power to fail.
    draft_probs = joint_probs(draft_table, params, 0, n_tokens)
    draft_stat = (((counts - draft_probs * runs) ** 2) / (draft_probs * runs).clamp(min=1e-3)).sum().item()
    assert draft_stat > chi_square_critical(df)
