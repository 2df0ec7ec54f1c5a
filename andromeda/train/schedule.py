"""Learning-rate schedule as a pure function of the step.

Offers `warmup_steps(max_steps, warmup_frac)` and `lr_at(step, ...)`: linear warmup to the
peak, then cosine decay to `min_ratio * peak` at the last step (Loshchilov & Hutter 2017,
with the 10% floor of Chinchilla / Llama). Because the rate depends on the step alone, the
only scheduler state a checkpoint needs is the step number, and a resumed run gets exactly
the rates of an uninterrupted one.
"""

from __future__ import annotations

import math


def warmup_steps(max_steps: int, warmup_frac: float) -> int:
    """Warmup length: ceil(frac * max_steps), so any positive fraction warms up at least one step."""
    return min(max_steps, math.ceil(warmup_frac * max_steps))


def lr_at(step: int, max_steps: int, peak_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Rate for optimizer step `step` (0-based).

    Warmup: peak * (step + 1) / warmup, so step 0 already moves and step warmup-1 reaches the
    peak. Decay: the cosine runs from the peak at step `warmup` to the floor at step
    max_steps - 1; steps past the end stay at the floor.
    """
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    floor = peak_lr * min_ratio
    span = max_steps - 1 - warmup
    if span <= 0:
        return peak_lr
    progress = min(1.0, (step - warmup) / span)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
