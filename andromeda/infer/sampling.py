"""Turning next-token logits into tokens: small functions in the style of gpt-fast.

- `SamplingParams`: temperature (0 = greedy), top-k, top-p, min-p, repetition penalty, token
  budget, stop strings and seed, checked on construction (a `UserError` says what to change).
- `apply_repetition_penalty`, `top_k_filter`, `top_p_filter`, `min_p_filter`: each takes
  logits (..., V) and returns logits with the excluded tokens at -inf.
- `logits_to_probs(logits, params, seen)`: the whole pipeline, in Hugging Face's order
  (penalty, temperature, top-k, top-p, min-p), returning probabilities; greedy gives one-hot.
- `sample(probs, generators)`: one token per row, each row drawn from its own seeded
  `torch.Generator`, so a sequence's sample does not depend on what else is in the batch.
- `make_generators(seed, n, device)`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from andromeda.errors import UserError

NEG_INF = float("-inf")


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_k: Optional[int] = None
    """Keep the k most likely tokens (None or 0: all)."""
    top_p: float = 1.0
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability sums to at least top_p."""
    min_p: float = 0.0
    """Keep tokens whose probability is at least min_p times the most likely one's (Nguyen et al. 2024)."""
    repetition_penalty: float = 1.0
    """CTRL's penalty (Keskar et al. 2019): logits of tokens already in the sequence (prompt
    included) are divided by it when positive and multiplied by it when negative."""
    stop: Sequence[str] = ()
    """Generation of a sequence ends when its text contains one of these; the stop string is
    not part of the returned text."""
    seed: Optional[int] = None
    """Sequence i of a request samples with a generator seeded seed + i (None: from torch's RNG)."""
    stop_at_eos: bool = True

    def __post_init__(self):
        if not self.max_new_tokens >= 1:
            raise UserError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min-p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (..., V), seen (..., V) bool: tokens already present get divided (positive
    logits) or multiplied (negative logits) by `penalty`."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep logits >= the k-th largest (ties with it are kept, as a threshold rule does)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p: a token is
    kept when the mass of the tokens ranked strictly above it is still < p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with prob >= min_p * (largest prob); in log space: logit >= max + log(min_p)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams,
                    seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (..., V) -> float32 probabilities after the full pipeline; one-hot when greedy."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        best = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(-1, best, 1.0)
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return torch.softmax(logits, dim=-1)


def make_generators(seed: Optional[int], n: int, device) -> list[Optional[torch.Generator]]:
    if seed is None:
        return [None] * n
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def sample(probs: torch.Tensor, generators: Sequence[Optional[torch.Generator]] | None = None) -> torch.Tensor:
    """probs (B, V) -> tokens (B,). Row b uses generators[b]. Draws argmax(probs / E) with E
    exponential(1) noise, which picks token i with probability probs[i] (the exponential race;
    gpt-fast uses it too because it needs no host synchronisation, unlike torch.multinomial)."""
    noise = torch.empty_like(probs)
    if generators is None:
        noise.exponential_()
    else:
        for row, gen in zip(noise, generators):
            row.exponential_(generator=gen)
    # A draw of exactly 0 would make 0/0 = NaN for an excluded token, and argmax takes NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return torch.argmax(probs / noise, dim=-1)


def pick(probs: torch.Tensor, params: SamplingParams,
         generators: Sequence[Optional[torch.Generator]] | None = None) -> torch.Tensor:
    """Greedy -> argmax (no randomness consumed); otherwise `sample`."""
    if params.greedy:
        return probs.argmax(dim=-1)
    return sample(probs, generators)
