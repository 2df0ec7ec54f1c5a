"""Attention kernels behind one function, `attend`.

Three paths compute the same function:
- 'sdpa': `F.scaled_dot_product_attention` with `is_causal` (flash / memory-efficient kernels
  on GPU) when nothing modifies the scores; with an additive mask otherwise.
- 'flex': FlexAttention (PyTorch >= 2.5) with ALiBi as a `score_mod` and causality, windows
  and document boundaries as a block-sparse `mask_mod`, so no L x L bias is ever built.
  Chosen by 'auto' on CUDA whenever scores are modified.
- 'reference': explicit bias tensor + SDPA math; the CPU default for modified scores and
  the ground truth in tests.

`force_backend()` overrides the choice for tests. Positions are absolute token indices:
`q_pos` (Lq,) for the queries and `k_pos` (Lk,) for the keys, so prefill, chunked prefill
and cached decoding (where unwritten cache slots have positions beyond the query and are
therefore masked as "future") all use one rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class AttnSpec:
    q_pos: torch.Tensor  # (Lq,) absolute positions of the queries
    k_pos: torch.Tensor  # (Lk,) absolute positions of the keys
    scale: float
    alibi: Optional[torch.Tensor] = None  # (H,) slopes; zeros for heads without ALiBi
    window: Optional[int] = None
    doc_ids: Optional[torch.Tensor] = None  # (B, L) document index per token (no cache)
    dropout: float = 0.0
    plain_causal: bool = False  # q_pos == k_pos == arange(L): the is_causal fast path applies
    all_visible: bool = False  # every key is at or before every query (one-token decode)
    backend: str = "auto"


_FORCED: Optional[str] = None


@contextlib.contextmanager
def force_backend(name: Optional[str]):
    """Route every attention call through backend `name` inside the block (tests)."""
    global _FORCED
    previous, _FORCED = _FORCED, name
    try:
        yield
    finally:
        _FORCED = previous


def _modified(spec: AttnSpec) -> bool:
    return spec.alibi is not None or spec.window is not None or spec.doc_ids is not None


def choose_backend(spec: AttnSpec, device: torch.device) -> str:
    name = _FORCED or spec.backend
    if name != "auto":
        return name
    if not _modified(spec) or spec.dropout > 0:
        return "sdpa"
    return "flex" if device.type == "cuda" else "reference"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """q (B, H, Lq, hd), k and v (B, KVH, Lk, hd) with H % KVH == 0 -> (B, H, Lq, hd)."""
    backend = choose_backend(spec, q.device)
    if backend == "flex":
        return _flex(q, k, v, spec)
    gqa = q.shape[1] != k.shape[1]
    if backend == "sdpa" and not _modified(spec) and spec.plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=spec.dropout,
                                              scale=spec.scale, enable_gqa=gqa)
    if backend == "sdpa" and not _modified(spec) and spec.all_visible:
        return F.scaled_dot_product_attention(q, k, v, scale=spec.scale, enable_gqa=gqa)
    bias = score_bias(spec, q.shape[1], q.dtype)
    if backend == "reference" and gqa:  # the math path repeats KV heads explicitly
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=spec.dropout,
                                          scale=spec.scale, enable_gqa=gqa)


def score_bias(spec: AttnSpec, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias (B or 1, H or 1, Lq, Lk): -inf where masked, -slope*distance for ALiBi."""
    dist = spec.q_pos[:, None] - spec.k_pos[None, :]  # (Lq, Lk), >= 0 for visible keys
    allowed = dist >= 0
    if spec.window is not None:
        allowed = allowed & (dist < spec.window)
    allowed = allowed[None, None]  # (1, 1, Lq, Lk)
    if spec.doc_ids is not None:
        same = spec.doc_ids[:, :, None] == spec.doc_ids[:, None, :]  # (B, L, L)
        allowed = allowed & same[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=dist.device)
    if spec.alibi is not None:
        bias = bias - spec.alibi.to(dtype)[None, :, None, None] * dist.to(dtype)[None, None]
    return bias.masked_fill(~allowed, float("-inf"))


# ---------------------------------------------------------------- FlexAttention path
_flex_compiled = None
_block_masks: dict = {}


def _flex_fn():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _block_mask(spec: AttnSpec, batch: int, lq: int, lk: int, device):
    """Block-sparse mask for causality/window/documents, built by compiled mask evaluation
    (memory O(L^2 / block^2), not O(L^2)). Cached when it depends only on shapes."""
    from torch.nn.attention.flex_attention import create_block_mask
    q_pos, k_pos, window, doc = spec.q_pos, spec.k_pos, spec.window, spec.doc_ids

    def mask_mod(b, h, qi, ki):
        qp, kp = q_pos[qi], k_pos[ki]
        ok = kp <= qp
        if window is not None:
            ok = ok & (qp - kp < window)
        if doc is not None:
            ok = ok & (doc[b, qi] == doc[b, ki])
        return ok

    cacheable = doc is None and spec.plain_causal
    key = (lq, lk, window, str(device))
    if cacheable and key in _block_masks:
        return _block_masks[key]
    mask = create_block_mask(mask_mod, batch if doc is not None else None, None, lq, lk,
                             device=device, _compile=True)
    if cacheable:
        _block_masks[key] = mask
    return mask


def _flex(q, k, v, spec: AttnSpec) -> torch.Tensor:
    q_pos, k_pos, slopes = spec.q_pos, spec.k_pos, spec.alibi
    score_mod = None
    if slopes is not None:
        slopes = slopes.to(torch.float32)

        def score_mod(score, b, h, qi, ki):
            return score - slopes[h] * (q_pos[qi] - k_pos[ki]).to(torch.float32)

    mask = _block_mask(spec, q.shape[0], q.shape[2], k.shape[2], q.device)
    return _flex_fn()(q, k, v, score_mod=score_mod, block_mask=mask, scale=spec.scale,
                      enable_gqa=q.shape[1] != k.shape[1])
