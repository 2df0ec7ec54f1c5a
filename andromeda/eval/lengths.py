"""Loss at several context lengths on the same target tokens (`andromeda eval --lengths`).

`evaluate_lengths` scores targets max(lengths) .. n-1 at every length L with sliding windows
of L input tokens that each score their last `stride` tokens, so every length predicts exactly
the same tokens and each prediction sees between L - stride + 1 and L tokens of context.
Differences between rows are therefore due to context length alone.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from andromeda.errors import UserError


def check_length(cfg, length: int) -> None:
    """A length beyond the trained context needs a position scheme that extrapolates."""
    pos = cfg.position
    if length <= cfg.max_seq_len:
        return
    if pos.kind == "learned":
        raise UserError(f"length {length} exceeds the model's {cfg.max_seq_len} learned positions")
    if pos.kind in ("rope", "xpos") and pos.rope_scaling == "none":
        raise UserError(f"length {length} exceeds max_seq_len {cfg.max_seq_len}; set position.rope_scaling "
                        f"(linear, ntk, yarn) and position.rope_factor >= {length / cfg.max_seq_len:g}, "
                        f"or pass --allow-extrapolation to measure it as is")


@torch.inference_mode()
def evaluate_lengths(model, data, lengths: Sequence[int], stride: Optional[int] = None,
                     allow_extrapolation: bool = False) -> list[dict]:
    lengths = sorted(set(int(x) for x in lengths))
    if not lengths or lengths[0] < 2:
        raise UserError(f"--lengths must be integers >= 2, got {lengths}")
    stride = stride or max(1, lengths[0] // 2)
    if not 1 <= stride <= lengths[0]:
        raise UserError(f"--stride must be between 1 and the shortest length {lengths[0]}, got {stride}")
    if not allow_extrapolation:
        for length in lengths:
            check_length(model.cfg, length)
    first, n = lengths[-1], data.length
    if n - first < 1:
        raise UserError(f"text too short: {n} tokens, need more than the longest length {first}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for length in lengths:
        nats, count = 0.0, 0
        for a in range(first, n, stride):  # targets a .. b-1, input tokens b-1-length .. b-2
            b = min(a + stride, n)
            buf = torch.from_numpy(data.tokens.read(b - 1 - length, length + 1).astype(np.int64))[None].to(device)
            logits = model(buf[:, :-1])[:, -(b - a):]
            nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), buf[:, -(b - a):].reshape(-1),
                                    reduction="sum").item()
            count += b - a
        loss = nats / count
        rows.append({"length": length, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count})
    model.train(was_training)
    return rows
