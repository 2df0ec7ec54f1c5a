"""Loss at several context lengths on the same target tokens (`andromeda eval --lengths`).

`evaluate_lengths` scores targets max(lengths) .. n-1 at every length L with sliding windows
of L input tokens that each score their last `stride` tokens, so every length predicts exactly
the same tokens and each prediction sees between L - stride + 1 and L tokens of context.
Differences between rows are therefore due to context length alone.

`plot_lengths` draws one or more such curves (loss against length, log-2 length axis) with
matplotlib (the `plot` extra); benchmarks/long_context_plot.py uses it for several models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

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


def check_plot_path(out) -> Path:
    """Refuse a bad --plot destination before any scoring is spent."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG; give a file name ending in .png, got {out}")
    if not out.parent.is_dir():
        raise UserError(f"--plot: folder {out.parent} does not exist")
    return out


def plot_lengths(curves: Mapping[str, Sequence[dict]], out, title: str = "") -> Path:
    """Write a PNG of loss against context length, one line per entry of `curves`."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'andromeda[plot]'") from None
    out = check_plot_path(out)
    fig, ax = plt.subplots(figsize=(10, 4.5) if len(curves) > 1 else (7, 4.5))
    for label, rows in curves.items():
        ax.plot([r["length"] for r in rows], [r["loss"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("loss (nats/token), same targets")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves cross anywhere
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
