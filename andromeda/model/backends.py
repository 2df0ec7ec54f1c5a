"""Attention kernels behind one function, `attend`.

Three paths compute the same function:
- 'sdpa': `F.scaled_dot_product_attention` with `is_causal` (flash / memory-efficient kernels
  on GPU) when nothing modifies the scores; with an additive mask otherwise.
- 'flex': FlexAttention (PyTorch >= 2.5) with ALiBi as a `score_mod` and causality, windows
  and document boundaries as a block-sparse `mask_mod`, so no L x L bias is ever built.
  Chosen by 'auto' on CUDA whenever scores are modified.
- 'reference': explicit bias tensor + SDPA math; the ground truth in tests, and the CPU
  default for short modified prefills and for decoding.
- 'chunked': the reference computation one block of query rows at a time, with the bias built
  per block, so memory is O(chunk x Lk) instead of O(Lq x Lk). The CPU default for modified
  scores once a prefill has more than `QUERY_CHUNK` query rows (long-context ALiBi on CPU).

`force_backend()` overrides the choice for tests. Positions are absolute token indices:
`q_pos` (B or 1, Lq) for the queries (one row when every sequence shares them) and `k_pos`
(Lk,) for the keys, so prefill, chunked prefill and cached decoding (where unwritten cache
slots have positions beyond the query and are therefore masked as "future") all use one rule.
The two fast-path facts (`plain_causal`, `all_visible`) are derived once, by the attention
layer, from the call's `Positions` and the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class AttnSpec:
    q_pos: torch.Tensor  # (B or 1, Lq) absolute positions of the queries
    k_pos: torch.Tensor  # (Lk,) absolute positions of the keys
    scale: float
    alibi: Optional[torch.Tensor] = None  # (H,) slopes; zeros for heads without ALiBi
    alibi_heads: int = 0  # the first alibi_heads heads have non-zero slopes
    window: Optional[int] = None
    doc_ids: Optional[torch.Tensor] = None  # (B, L) document index per token (no cache)
    dropout: float = 0.0
    plain_causal: bool = False  # keys are the queries' tokens, in order: the is_causal fast path applies
    all_visible: bool = False  # every key is at or before every query (one-token decode)
    backend: str = "auto"


_FORCED: Optional[str] = None
QUERY_CHUNK = 512  # query rows per block on the 'chunked' path


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
    # Decoding (one query row, or per-sequence positions): the explicit bias is only
    # (B, H, 1, Lk), cheaper than building a block mask at every step.
    decoding = spec.q_pos.shape[0] > 1 or spec.q_pos.shape[1] == 1
    if device.type == "cuda" and not decoding:
        return "flex"
    return "chunked" if spec.q_pos.shape[1] > QUERY_CHUNK else "reference"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """q (B, H, Lq, hd), k and v (B, KVH, Lk, hd) with H % KVH == 0 -> (B, H, Lq, hd)."""
    backend = choose_backend(spec, q.device)
    if backend != "sdpa" and _FORCED is None and _can_split_alibi(spec, q.shape[1], k.shape[1]):
        return _split_alibi(q, k, v, spec, backend)
    return _run(backend, q, k, v, spec)


def _run(backend: str, q, k, v, spec: AttnSpec) -> torch.Tensor:
    if backend == "flex":
        return _flex(q, k, v, spec)
    if backend == "chunked":
        return _chunked(q, k, v, spec)
    gqa = q.shape[1] != k.shape[1]
    if backend == "sdpa" and not _modified(spec) and spec.plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=spec.dropout,
                                              scale=spec.scale, enable_gqa=gqa)
    if backend == "sdpa" and not _modified(spec) and spec.all_visible:
        return F.scaled_dot_product_attention(q, k, v, scale=spec.scale, enable_gqa=gqa)
    bias = score_bias(spec, q.dtype)
    if backend == "reference" and gqa:  # the math path repeats KV heads explicitly
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=spec.dropout,
                                          scale=spec.scale, enable_gqa=gqa)


def _can_split_alibi(spec: AttnSpec, heads: int, kv_heads: int) -> bool:
    """ALiBi on only some heads, nothing else modifying scores: the plain heads can take the
    flash kernel. Needs the ALiBi heads to own whole KV groups (always true for MQA)."""
    n = spec.alibi_heads
    if spec.alibi is None or not 0 < n < heads or spec.window is not None or spec.doc_ids is not None:
        return False
    if not spec.plain_causal or spec.dropout > 0:
        return False
    return kv_heads == 1 or n % (heads // kv_heads) == 0


def _split_alibi(q, k, v, spec: AttnSpec, backend: str) -> torch.Tensor:
    """Heads [0, n) with ALiBi through the bias-capable backend, heads [n, H) through
    SDPA's causal flash path; outputs concatenated back in head order."""
    n, heads, kv_heads = spec.alibi_heads, q.shape[1], k.shape[1]
    kv_n = kv_heads if kv_heads == 1 else n // (heads // kv_heads)
    kv_rest = slice(0, 1) if kv_heads == 1 else slice(kv_n, kv_heads)
    biased_spec = dataclasses.replace(spec, alibi=spec.alibi[:n], backend=backend)
    biased = _run(backend, q[:, :n], k[:, :kv_n], v[:, :kv_n], biased_spec)
    plain_spec = dataclasses.replace(spec, alibi=None, alibi_heads=0, backend="sdpa")
    plain = _run("sdpa", q[:, n:], k[:, kv_rest], v[:, kv_rest], plain_spec)
    return torch.cat([biased, plain], dim=1)


def _chunked(q, k, v, spec: AttnSpec) -> torch.Tensor:
    """Query blocks of QUERY_CHUNK rows through the reference path; each block's bias is
    (B or 1, H or 1, chunk, Lk), so no Lq x Lk tensor exists at any time."""
    if q.shape[1] != k.shape[1]:  # repeat KV heads once, outside the loop
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for start in range(0, q.shape[2], QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        bias = score_bias(spec, q.dtype, rows=rows)
        out[:, :, rows] = F.scaled_dot_product_attention(
            q[:, :, rows], k, v, attn_mask=bias, dropout_p=spec.dropout, scale=spec.scale)
    return out


def score_bias(spec: AttnSpec, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
    """Additive bias (B or 1, H or 1, Lq, Lk): -inf where masked, -slope*distance for ALiBi.
    `rows` restricts it to a block of query rows (the 'chunked' path)."""
    dist = (spec.q_pos[:, rows, None] - spec.k_pos)[:, None]  # (B or 1, 1, Lq, Lk); >= 0 if visible
    allowed = dist >= 0
    if spec.window is not None:
        allowed = allowed & (dist < spec.window)
    if spec.doc_ids is not None:
        same = spec.doc_ids[:, rows, None] == spec.doc_ids[:, None, :]  # (B, Lq, L)
        allowed = allowed & same[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=dist.device)
    if spec.alibi is not None:
        bias = bias - spec.alibi.to(dtype)[None, :, None, None] * dist.to(dtype)
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


_create_block_mask = None


def _compiled_create_block_mask():
    """create_block_mask under torch.compile evaluates the mask blockwise instead of
    materialising an L x L boolean tensor (10 GB at 32k tokens)."""
    global _create_block_mask
    if _create_block_mask is None:
        from torch.nn.attention.flex_attention import create_block_mask
        _create_block_mask = torch.compile(create_block_mask)
    return _create_block_mask


def _block_mask(spec: AttnSpec, batch: int, lq: int, lk: int, device):
    """Block-sparse mask for causality/window/documents, built by compiled mask evaluation
    (memory O(L^2 / block^2), not O(L^2)). Cached when it depends only on shapes."""
    q_pos, k_pos, window, doc = spec.q_pos, spec.k_pos, spec.window, spec.doc_ids
    per_sequence = q_pos.shape[0] > 1

    def mask_mod(b, h, qi, ki):
        qp, kp = (q_pos[b, qi] if per_sequence else q_pos[0, qi]), k_pos[ki]
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
    mask = _compiled_create_block_mask()(mask_mod, batch if doc is not None or per_sequence else None, None,
                                         lq, lk, device=device)
    if cacheable:
        _block_masks[key] = mask
    return mask


def _flex(q, k, v, spec: AttnSpec) -> torch.Tensor:
    q_pos, k_pos, slopes = spec.q_pos, spec.k_pos, spec.alibi
    score_mod = None
    if slopes is not None:
        slopes = slopes.to(torch.float32)

        per_sequence = q_pos.shape[0] > 1

        def score_mod(score, b, h, qi, ki):
            qp = q_pos[b, qi] if per_sequence else q_pos[0, qi]
            return score - slopes[h] * (qp - k_pos[ki]).to(torch.float32)

    mask = _block_mask(spec, q.shape[0], q.shape[2], k.shape[2], q.device)
    return _flex_fn()(q, k, v, score_mod=score_mod, block_mask=mask, scale=spec.scale,
                      enable_gqa=q.shape[1] != k.shape[1])
