"""Loss, perplexity and bits per byte of a model on held-out text (`andromeda eval`).

- `evaluate(model, tokenizer, source, seq_len, batch_size, stride=None, doc_mask=False)`
  -> {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "seq_len", "stride"}.
- `load_eval_tokens(source, tokenizer, split, doc_start) -> EvalTokens`: the token stream to
  score, from a text file, a folder of text (or any input `prepare` reads), or a prepared data
  folder (its val split).
- `resolve_doc_start(tokenizer, doc_start)`: the token put before each document.

What is scored: each document of a text source is `[start] + tokens`, where the start token is
BOS for tokenizers that add it (imported Llama-style models read text that way), else EOS (how
`prepare` separates documents of training data); `doc_start` picks the other convention, or
none. A prepared folder is read as prepared (EOS). Every token after the first is predicted
exactly once. By default the
scored ranges do not overlap (window k reads tokens kL .. kL+L-1 and scores its predictions of
kL+1 .. kL+L), so early tokens of a window see little context; the last, shorter range is read
with earlier tokens in front so its window is full length too. `stride=S < L` gives the sliding evaluation of
Press et al. 2021 / Hugging Face's perplexity guide: each window still holds up to L tokens
of context but only its last S predictions are scored, so every scored token sees at least
L - S tokens of context (more accurate, L/S times the compute).

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text, which compares models with
different tokenizers (Gao et al. 2020, The Pile). End-of-text tokens carry no bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from andromeda.data.loader import window_doc_ids
from andromeda.data.prepare import META, PreparedData, open_prepared
from andromeda.data.sources import iter_pieces, resolve_sources
from andromeda.data.tokenizer import Tokenizer
from andromeda.errors import UserError


@dataclass
class EvalTokens:
    """`tokens` supports `read(start, n)` (a prepared split's TokenStream, or `_Array`);
    `bytes` are the UTF-8 bytes of the text behind tokens[1:], the ones that get scored."""

    tokens: object
    length: int
    doc_starts: np.ndarray
    bytes: int
    doc_start: str = "eos"  # the token before each document: 'bos', 'eos' or 'none'


class _Array:
    def __init__(self, array: np.ndarray):
        self.array = array

    def read(self, start: int, n: int) -> np.ndarray:
        return self.array[start:start + n]


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    if a.spec() != b.spec() or a.vocab_size != b.vocab_size:
        return False
    if hasattr(a, "tok") and hasattr(b, "tok"):  # Hugging Face: same spec, compare the vocabularies
        return a.tok.get_vocab() == b.tok.get_vocab()
    if hasattr(a, "proto") and hasattr(b, "proto"):
        return a.proto == b.proto
    return True


DOC_STARTS = ("auto", "bos", "eos", "none")


def resolve_doc_start(tokenizer: Tokenizer, doc_start: str = "auto") -> str:
    """'bos', 'eos' or 'none': the token before each document; 'auto' is BOS when the
    tokenizer adds it to every text (`Tokenizer.add_bos`), else EOS when it has one."""
    if doc_start not in DOC_STARTS:
        raise UserError(f"doc_start must be one of {', '.join(DOC_STARTS)}, got {doc_start!r}")
    if doc_start == "auto":
        return "bos" if tokenizer.add_bos and tokenizer.bos_id is not None else (
            "eos" if tokenizer.eos_id is not None else "none")
    if getattr(tokenizer, f"{doc_start}_id", 0) is None:
        raise UserError(f"the tokenizer has no {doc_start.upper()} token; choose another document start")
    return doc_start


def load_eval_tokens(source: Union[str, Path, PreparedData], tokenizer: Tokenizer, split: str = "val",
                     doc_start: str = "auto") -> EvalTokens:
    start = resolve_doc_start(tokenizer, doc_start)
    if isinstance(source, PreparedData) or (Path(source).is_dir() and (Path(source) / META).exists()):
        if doc_start not in ("auto", "eos"):
            raise UserError(f"a prepared data folder separates documents with EOS as prepared; to score with "
                            f"--doc-start {doc_start}, pass the text itself")
        data = open_prepared(source)
        if not _same_tokenizer(data.tokenizer, tokenizer):
            raise UserError(f"{data.folder} was prepared with tokenizer {data.tokenizer.spec()['kind']} "
                            f"({data.tokenizer.vocab_size} ids), not the checkpoint's "
                            f"{tokenizer.spec()['kind']} ({tokenizer.vocab_size} ids)")
        stream = data.split(split)
        if len(stream) < 2:
            raise UserError(f"the {split} split of {data.folder} has {len(stream)} tokens; nothing to score")
        first = stream.read(0, 1).tolist()
        n_bytes = data.meta["splits"][split]["bytes"] - tokenizer.bytes_of(first)
        return EvalTokens(stream, len(stream), np.asarray(data.doc_starts[split], dtype=np.int64), n_bytes, "eos")
    sources = resolve_sources([str(source)])
    parts: list[np.ndarray] = []
    starts: list[int] = []
    n_tokens = n_bytes = 0
    prefix = {"bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id], "none": []}[start]
    for begins, text in iter_pieces(sources):
        ids = (prefix if begins else []) + tokenizer.encode(text)
        if begins:
            starts.append(n_tokens)
        parts.append(np.asarray(ids, dtype=np.int64))
        n_tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
    if n_bytes == 0:
        raise UserError(f"{source} holds no text to evaluate")
    tokens = np.concatenate(parts)
    if len(tokens) < 2:
        raise UserError(f"{source} is one token long; nothing to score")
    n_bytes -= tokenizer.bytes_of(tokens[:1].tolist())
    return EvalTokens(_Array(tokens), len(tokens), np.asarray(starts, dtype=np.int64), n_bytes, start)


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(first input token, window length, scored predictions at its end) covering targets 1..n-1."""
    out = []
    for a in range(1, n, stride):  # targets a .. b-1
        b = min(a + stride, n)
        c = max(0, b - 1 - seq_len)
        out.append((c, b - 1 - c, b - a))
    return out


@torch.inference_mode()
def evaluate(model, tokenizer: Tokenizer, source, seq_len: int, batch_size: int = 8,
             stride: Optional[int] = None, doc_mask: bool = False, split: str = "val") -> dict:
    data = source if isinstance(source, EvalTokens) else load_eval_tokens(source, tokenizer, split)
    stride = seq_len if stride is None else stride
    if seq_len < 1 or batch_size < 1 or not 1 <= stride <= seq_len:
        raise UserError(f"need seq_len >= 1, batch_size >= 1 and 1 <= stride <= seq_len "
                        f"(got {seq_len}, {batch_size}, {stride})")
    cfg = model.cfg
    if cfg.position.kind == "learned" and seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's {cfg.max_seq_len} learned positions")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    windows = _windows(data.length, seq_len, stride)
    i = 0
    while i < len(windows):
        # Consecutive windows of one shape form a batch (only the first and last differ).
        j = i + 1
        while j < len(windows) and j - i < batch_size and windows[j][1:] == windows[i][1:]:
            j += 1
        group, (_, length, scored) = windows[i:j], windows[i]
        buf = torch.from_numpy(np.stack([data.tokens.read(c, length + 1) for c, _, _ in group]).astype(np.int64))
        buf = buf.to(device)
        x, y = buf[:, :-1], buf[:, 1:]
        ids = None
        if doc_mask:
            ids = torch.from_numpy(np.stack([window_doc_ids(data.doc_starts, c, length) for c, _, _ in group]))
            ids = ids.to(device)
        logits = model(x, doc_ids=ids)[:, -scored:]
        nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y[:, -scored:].reshape(-1),
                                reduction="sum").item()
        count += y[:, -scored:].numel()
        i = j
    model.train(was_training)
    loss = nats / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": nats / math.log(2) / data.bytes if data.bytes > 0 else float("nan"),
            "tokens": count, "bytes": data.bytes, "seq_len": seq_len, "stride": stride, "doc_start": data.doc_start}
