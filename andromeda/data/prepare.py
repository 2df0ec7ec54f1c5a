"""Sources -> tokenizer -> token shards with a train/val split (`andromeda prepare`).

- `prepare(sources, out_dir, tokenizer_spec, ...) -> meta`: stream every document through the
  tokenizer into `train_*.bin` / `val_*.bin` shards; writes `meta.json` and the tokenizer files.
- `prepare_default_corpus(out_dir, ...)`: the same on the running Python's standard library
  sources, a corpus every machine has (works offline).
- `build_tokenizer(spec, sources, ...)`: byte | char | bpe:N | path to tokenizer.json / .model.
- `open_prepared(dir) -> PreparedData`: meta, tokenizer and memory-mapped splits.

Layout decisions (docs/data.md has the full format): every document is written as
`[EOS] + tokens(text)`, so the end-of-text id separates documents and also starts the first
one; `<split>.docs.bin` lists where each document starts, which gives exact `doc_ids` for
document masking even when a text happens to contain the end-of-text string.
Validation documents are picked by systematic sampling (every 1/f-th document, with a phase
drawn from the seed), which needs no count of the corpus up front. Document 0 always goes to
training. If no document was picked, the last one is moved to validation, unless it holds
more than half the tokens (or is the only one): then the end of the token stream is cut off
as validation instead.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from andromeda.data.shards import SplitWriter, TokenStream, dtype_for_vocab, read_doc_starts
from andromeda.data.sources import Piece, Source, file_record, iter_pieces, resolve_sources, stdlib_sources
from andromeda.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_path,
    train_bpe,
)
from andromeda.errors import UserError
from andromeda.jsonfile import read_json

FORMAT = "andromeda-tokens"
VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.0005
SHARD_TOKENS = 64 * 2**20
DEFAULT_CORPUS_BYTES = 4_000_000
DEFAULT_CORPUS_MIN_VAL_TOKENS = 16384
_BATCH_CHARS = 1 << 22  # text tokenized in one call (the HF library spreads a batch over threads)
_BATCH_PIECES = 512


def _limited(pieces: Iterable[Piece], max_docs: Optional[int], max_bytes: Optional[int]) -> Iterator[Piece]:
    """Stop before the document that would exceed `max_docs`, or once `max_bytes` of text
    has been read (the last document is kept whole). Deterministic, so every pass over the
    corpus (tokenizer training, then encoding) sees the same documents."""
    docs = seen = 0
    for starts, text in pieces:
        if starts:
            if (max_docs is not None and docs >= max_docs) or (max_bytes is not None and seen >= max_bytes):
                return
            docs += 1
        seen += len(text.encode("utf-8"))
        yield starts, text


def build_tokenizer(spec: str, pieces_factory) -> Tokenizer:
    """`pieces_factory()` gives a fresh iterator over the corpus (char and bpe read it once)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        chars: set[str] = set()
        for _, text in pieces_factory():
            chars.update(text)
        if not chars:
            raise UserError("the corpus has no text to build a character vocabulary from")
        return CharTokenizer(sorted(chars))
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"bpe tokenizer is written bpe:VOCAB_SIZE, got {spec!r}") from None
        return train_bpe((text for _, text in pieces_factory()), size)
    path = Path(spec)
    if path.suffix in (".json", ".model") or path.is_dir():
        return tokenizer_from_path(path)
    raise UserError(f"unknown tokenizer {spec!r}: use byte, char, bpe:N, or a path to tokenizer.json / .model")


def _encoder(tokenizer: Tokenizer):
    """list of texts -> list of token arrays, with fast paths where the tokenizer has them."""
    if isinstance(tokenizer, ByteTokenizer):
        return lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    if isinstance(tokenizer, HFTokenizer):
        return lambda texts: [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    return lambda texts: [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_PIECES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ValPicker:
    """Systematic sampling: document i (i >= 1) is validation when floor(i*f + phase) steps up."""

    def __init__(self, fraction: float, seed: int):
        self.f = fraction
        self.phase = float(np.random.default_rng(seed).random())

    def is_val(self, i: int) -> bool:
        return i > 0 and math.floor(i * self.f + self.phase) > math.floor((i - 1) * self.f + self.phase)


def _move_tail(train: SplitWriter, val: SplitWriter, n: int, tokenizer: Tokenizer) -> None:
    if n <= 0:
        return
    tail, starts = train.take_tail(n)
    n_bytes = tokenizer.bytes_of(tail.tolist())
    train.bytes -= n_bytes
    val.append_stream(tail, starts, n_bytes)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / META).exists():
        raise UserError(f"--out {out} is a non-empty folder that is not prepared data; choose another path")


def prepare(sources: list[Union[str, Source]], out_dir, tokenizer_spec: str = "byte", *,
            field: str = "text", val_fraction: float = DEFAULT_VAL_FRACTION, doc_mask: bool = False,
            max_docs: Optional[int] = None, max_bytes: Optional[int] = None, min_val_tokens: int = 0,
            shard_tokens: int = SHARD_TOKENS, seed: int = 0, progress: bool = True) -> dict:
    """Tokenize `sources` into `out_dir` and return the meta dict written to meta.json.

    `doc_mask` records that models trained on this data should mask attention across
    documents (`TokenLoader(doc_mask=None)` follows it); the document index is written
    either way. `min_val_tokens` moves tokens from the end of training to validation until
    validation holds that many (capped at half the corpus)."""
    from andromeda.checkpoint import atomic_folder_write

    if not 0.0 < val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard size must be at least one token, got {shard_tokens}")
    resolved = [s for item in sources for s in ([item] if isinstance(item, Source) else resolve_sources([item], field))]
    if not resolved:
        raise UserError("no data given")
    out = Path(out_dir)
    _check_out_dir(out)

    def pieces(on_file=None):
        return _limited(iter_pieces(resolved, on_file), max_docs, max_bytes)

    tokenizer = build_tokenizer(tokenizer_spec, pieces)
    meta_box: dict = {}

    def fill(folder: Path) -> None:
        meta_box.update(_write_splits(folder, tokenizer, pieces, val_fraction, min_val_tokens, shard_tokens,
                                      seed, progress))
        meta = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer.spec(),
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, **meta_box,
                "doc_mask": bool(doc_mask), "layout": "each document is [eos] + tokens",
                "val_fraction": val_fraction, "seed": seed, "max_docs": max_docs, "max_bytes": max_bytes,
                "inputs": [s if isinstance(s, str) else s.label for s in sources], "python": platform.python_version()}
        tokenizer.save(folder)
        (folder / META).write_text(json.dumps(meta, indent=2))
        meta_box.clear()
        meta_box.update(meta)

    try:
        atomic_folder_write(out, fill)
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}") from None
    return dict(meta_box)


def _write_splits(folder: Path, tokenizer: Tokenizer, pieces, val_fraction: float, min_val_tokens: int,
                  shard_tokens: int, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writers = {s: SplitWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    picker = _ValPicker(val_fraction, seed)
    encode = _encoder(tokenizer)
    files: list[Path] = []
    docs, current = 0, writers["train"]
    bar = tqdm(unit="doc", desc="prepare", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with bar:
        for batch in _batches(pieces(files.append)):
            for (starts, text), ids in zip(batch, encode([t for _, t in batch])):
                if starts:
                    current = writers["val" if picker.is_val(docs) else "train"]
                    current.begin_document(tokenizer.eos_id)
                    docs += 1
                    bar.update(1)
                if len(ids) and int(ids.max()) >= tokenizer.vocab_size:  # guards a mismatched tokenizer file
                    raise UserError(f"tokenizer produced id {int(ids.max())} >= its vocab size {tokenizer.vocab_size}")
                current.write(ids, len(text.encode("utf-8")))
            bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens, refresh=False)
    train, val = writers["train"], writers["val"]
    if docs == 0:
        raise UserError("the corpus is empty: no documents were found")
    if train.bytes + val.bytes == 0:
        raise UserError("the corpus is empty: every document has no text")
    train.finish()
    # One cut from the end of training, so moved text keeps its order: the last document, or
    # for a corpus dominated by it (or of one document) the end of the token stream, when no
    # document was picked; more if validation is still below min_val_tokens.
    move = 0
    if val.documents == 0:
        last_size = train.tokens - int(read_doc_starts(train.doc_path)[-1])
        if train.documents >= 2 and last_size <= train.tokens // 2:
            move = last_size
        else:
            move = min(max(1, round(val_fraction * train.tokens)), train.tokens - 2)
    move = max(move, min(min_val_tokens - val.tokens, train.tokens // 2))
    _move_tail(train, val, move, tokenizer)
    splits = {"train": train.finish(), "val": val.finish()}
    if splits["train"]["tokens"] < 2 or splits["val"]["tokens"] < 1:
        raise UserError(f"the corpus is too small to split ({train.tokens + val.tokens} tokens)")
    return {"dtype": dtype.name, "splits": splits, "documents": docs,
            "sources": [file_record(p) for p in files]}


def prepare_default_corpus(out_dir, tokenizer_spec: str = "byte", *, max_docs: Optional[int] = None,
                           max_bytes: Optional[int] = DEFAULT_CORPUS_BYTES,
                           min_val_tokens: int = DEFAULT_CORPUS_MIN_VAL_TOKENS, **kwargs) -> dict:
    """Prepare the standard library's .py files (sorted by path, the first `max_bytes`)."""
    return prepare(stdlib_sources(), out_dir, tokenizer_spec, max_docs=max_docs, max_bytes=max_bytes,
                   min_val_tokens=min_val_tokens, **kwargs)


@dataclass
class PreparedData:
    """A prepared data folder: `meta`, `tokenizer`, and per split a memory-mapped
    `TokenStream` (`streams["train"]`) and document start offsets (`doc_starts["train"]`)."""

    folder: Path
    meta: dict
    tokenizer: Tokenizer
    streams: dict = field(default_factory=dict)
    doc_starts: dict = field(default_factory=dict)

    @property
    def train(self) -> TokenStream:
        return self.streams["train"]

    @property
    def val(self) -> TokenStream:
        return self.streams["val"]

    def split(self, name: str) -> TokenStream:
        if name not in self.streams:
            raise UserError(f"unknown split {name!r}; prepared data has {', '.join(self.streams)}")
        return self.streams[name]


def open_prepared(folder) -> PreparedData:
    """Open a prepared data folder (a `PreparedData` passes through unchanged)."""
    if isinstance(folder, PreparedData):
        return folder
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"prepared data folder not found: {folder}")
    path = folder / META
    if not path.exists():
        raise UserError(f"{folder} is not a prepared data folder (no {META}); run `andromeda prepare`")
    meta = read_json(path, "prepared data metadata")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path} is not {FORMAT} version {VERSION} data; prepare it again")
    dtype = np.dtype(meta["dtype"])
    data = PreparedData(folder, meta, load_tokenizer(meta["tokenizer"], folder))
    for name, split in meta["splits"].items():
        for shard in split["shards"]:
            file = folder / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not file.exists() or file.stat().st_size != expected:
                raise UserError(f"shard {file} is missing or not {expected} bytes; prepare the data again")
        data.streams[name] = TokenStream(folder, [(s["file"], s["tokens"]) for s in split["shards"]], dtype)
        data.doc_starts[name] = read_doc_starts(folder / split["doc_index"])
    return data
