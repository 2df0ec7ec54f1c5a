"""Speculative decoding with a small draft model that shares the target's tokenizer.

A round: the draft proposes k tokens one by one (probabilities q_i); the target scores the
last accepted token plus all k proposals in one forward (probabilities p_i); proposal d_i
is accepted with probability min(1, p_i(d_i) / q_i(d_i)), and at the first rejection a token
is drawn from normalise(max(0, p_i - q_i)); if all k pass, one more token comes from p_k.
The output then follows the target's distribution exactly (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling"). With temperature 0, p and q are one-hot
and the output is the target's greedy output. p and q are the distributions after the whole
sampling pipeline (temperature, top-k/p, min-p, repetition penalty), so that is what the
output follows.

- `Speculator`: one sequence's state: `start(prompt_ids)` then `step()` -> list of new tokens;
  `accepted` / `proposed` count draft tokens.
- `stream_speculative(engine, ids, params, index)`: the engine's speculative path.

Caches: KV slots written for rejected proposals are simply overwritten later (reads stop
at the current position). Recurrent states (token shift) have no positions, so they are
snapshotted before a round and restored when it ends in a rejection; the accepted tokens are
then fed again at the start of the next round.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from andromeda.infer.cache import recurrent_buffers
from andromeda.infer.generate import prefill
from andromeda.infer.sampling import SamplingParams, logits_to_probs, make_generators, sample


class _Fed:
    """A model, its cache and how many tokens of the sequence the cache holds."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.pos = 0
        self.recurrent = recurrent_buffers(cache)
        self.max_len = cache.max_len

    def snapshot(self) -> Optional[tuple[int, list[torch.Tensor]]]:
        return (self.pos, [b.clone() for b in self.recurrent]) if self.recurrent else None

    def restore(self, snap) -> None:
        pos, saved = snap
        for buf, old in zip(self.recurrent, saved):
            buf.copy_(old)
        self.pos = pos

    def feed(self, ids: list[int], device, last_only: bool = True) -> torch.Tensor:
        """Run the tokens ids at self.pos..; return logits (L or 1, V)."""
        x = torch.tensor([ids], dtype=torch.long, device=device)
        out = self.model(x, cache=self.cache, start_pos=self.pos, last_only=last_only)[0]
        self.pos += len(ids)
        return out


class Speculator:
    def __init__(self, target, draft, params: SamplingParams, k: int = 4, device=None,
                 generator: Optional[torch.Generator] = None, max_len: Optional[int] = None,
                 prefill_chunk: Optional[int] = None):
        self.params, self.k, self.gen = params, k, generator
        self.device = device or next(target.parameters()).device
        t_len = min(max_len or target.cfg.max_seq_len, target.cfg.max_seq_len)
        d_len = min(max_len or draft.cfg.max_seq_len, draft.cfg.max_seq_len)
        self.target = _Fed(target, target.new_cache(1, t_len, device=self.device))
        self.draft = _Fed(draft, draft.new_cache(1, d_len, device=self.device))
        self.vocab = target.cfg.vocab_size
        self.prefill_chunk = prefill_chunk
        self.seq: list[int] = []
        self.accepted = self.proposed = 0

    def _seen(self, ids: list[int]) -> Optional[torch.Tensor]:
        if self.params.repetition_penalty == 1.0:
            return None
        seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        seen[torch.tensor(ids, dtype=torch.long, device=self.device)] = True
        return seen

    def _probs(self, logits: torch.Tensor, context: list[int]) -> torch.Tensor:
        return logits_to_probs(logits, self.params, self._seen(context))

    def _draw(self, probs: torch.Tensor) -> int:
        if self.params.greedy:
            return int(probs.argmax())
        return int(sample(probs[None], [self.gen])[0])

    def start(self, prompt: list[int]) -> int:
        """Prefill both models with the prompt; return the first new token (from the target)."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = prefill(self.target.model, ids, self.target.cache, 0, self.prefill_chunk)[0]
        self.target.pos = len(prompt)
        if len(prompt) <= self.draft.max_len:
            prefill(self.draft.model, ids, self.draft.cache, 0, self.prefill_chunk)
            self.draft.pos = len(prompt)
        token = self._draw(self._probs(logits, prompt))
        self.seq = list(prompt) + [token]
        return token

    def step(self, max_tokens: int) -> list[int]:
        """One round; returns 1..k+1 new tokens (at most max_tokens >= 1)."""
        n0 = len(self.seq)
        # The target writes positions up to n0 - 1 + k, the draft up to n0 - 2 + k.
        k = max(0, min(self.k, max_tokens - 1, self.target.max_len - n0, self.draft.max_len - n0 + 1))
        drafts, qs = self._propose(k)
        snap_t = self.target.snapshot()
        fed = self.seq[self.target.pos:] + drafts
        logits = self.target.feed(fed, self.device, last_only=False)[-(k + 1):]  # (k+1, V)
        n, new = self._verify(drafts, qs, logits)
        self.seq += drafts[:n] + [new]
        self.accepted += n
        self.proposed += k
        if n < k and snap_t is not None:
            self.target.restore(snap_t)
        else:
            self.target.pos = n0 + n
        return drafts[:n] + [new]

    def _propose(self, k: int) -> tuple[list[int], list[torch.Tensor]]:
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        if k == 0:
            return drafts, qs
        d = self.draft
        snap = d.snapshot()
        n0 = len(self.seq)
        feed = self.seq[d.pos:]
        for i in range(k):
            q = self._probs(d.feed(feed, self.device)[-1], self.seq + drafts)
            drafts.append(self._draw(q))
            qs.append(q)
            feed = drafts[-1:]
        self._draft_snapshot, self._draft_end = snap, n0 + k - 1
        return drafts, qs

    def _verify(self, drafts: list[int], qs: list[torch.Tensor], logits: torch.Tensor) -> tuple[int, int]:
        """Return (number of accepted drafts, the next token)."""
        k = len(drafts)
        n = 0
        new = None
        for i, tok in enumerate(drafts):
            p = self._probs(logits[i], self.seq + drafts[:i])
            if self.params.greedy:
                ok = bool(p[tok] > 0.5)
            else:
                u = torch.rand((), generator=self.gen, device=self.device)
                ok = bool(u * qs[i][tok] < p[tok])  # u < p/q without dividing by a tiny q
            if not ok:
                residual = (p - qs[i]).clamp_(min=0)
                total = residual.sum()
                # p == q up to rounding: nothing to correct, draw from p itself.
                new = self._draw(residual / total if total > 0 else p)
                break
            n += 1
        if new is None:
            new = self._draw(self._probs(logits[k], self.seq + drafts))
        if k:
            self._settle_draft(n, k)
        return n, new

    def _settle_draft(self, n: int, k: int) -> None:
        """After a round the draft has fed the sequence plus drafts[:k-1]; keep what is valid."""
        d = self.draft
        if n < k - 1 and self._draft_snapshot is not None:
            d.restore(self._draft_snapshot)
        else:
            d.pos = min(self._draft_end, len(self.seq) + n)

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.accepted / self.proposed if self.proposed else None


def stream_speculative(engine, ids: list[int], params: SamplingParams, index: int = 0) -> Iterator:
    """The engine's path for one prompt with a draft model (batch of one)."""
    from andromeda.infer.engine import StreamEvent, _Sequence, synchronize

    seq = _Sequence(engine.tokenizer, len(ids), engine._budget(len(ids), params), params,
                    engine.eos_id if params.stop_at_eos else None)
    gen = make_generators(params.seed, index + 1, engine.device)[index]
    if gen is None and not params.greedy:
        gen = torch.Generator(device=engine.device).manual_seed(int(torch.randint(2**62, ()).item()))
    spec = Speculator(engine.model, engine.draft, params, engine.draft_tokens, engine.device, gen,
                      max_len=len(ids) + seq.budget + engine.draft_tokens + 1, prefill_chunk=engine.prefill_chunk)
    synchronize(engine.device)
    t0 = time.perf_counter()
    new = [spec.start(ids)]
    synchronize(engine.device)
    decode_start = time.perf_counter()
    prefill_ms = (decode_start - t0) * 1000
    while True:
        piece = "".join(seq.add(tok) for tok in new)
        if seq.finish_reason is not None:
            seq.decode_end = time.perf_counter()
            tail, result = seq.result(prefill_ms, decode_start, piece, spec.acceptance_rate)
            yield StreamEvent(index, tail, result)
            return
        if piece:
            yield StreamEvent(index, piece)
        new = spec.step(seq.budget - len(seq.ids))
