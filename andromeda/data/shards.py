"""Token shards on disk: raw little-endian .bin files that `np.memmap` reads directly.

A split (train or val) is one token stream cut into files `<split>_000000.bin`, ... of at most
`shard_tokens` tokens each, plus `<split>.docs.bin`: the uint64 offsets in that stream where
documents start (each document starts with the end-of-text id, see docs/data.md).

- `dtype_for_vocab(vocab_size)`: uint16 up to 65535 ids, else uint32.
- `SplitWriter`: appends documents, flushes full shards, can hand back its last tokens
  (`take_tail`) when the validation split is cut from the end of the training stream.
- `TokenStream`: the shards of a split as one indexable sequence (`read(start, n)`).
- `read_doc_starts(path)`: the document index as a memmap.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Optional

import numpy as np

DOC_INDEX_DTYPE = np.dtype("<u8")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def doc_index_name(split: str) -> str:
    return f"{split}.docs.bin"


class SplitWriter:
    """Writes one split. Tokens are buffered and written in whole shards, so memory holds at
    most one shard (plus the current document) whatever the corpus size."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype = Path(folder), split, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[int] = []  # token counts of the files written so far
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0
        self.documents = 0
        self.bytes = 0
        self.doc_path = self.folder / doc_index_name(split)
        self.doc_starts: list[int] = []  # pending entries of the document index

    def begin_document(self, eos_id: Optional[int]) -> None:
        self.documents += 1
        self.doc_starts.append(self.tokens)
        if eos_id is not None:
            self.write(np.array([eos_id], dtype=self.dtype))

    def write(self, tokens: np.ndarray, n_bytes: int = 0) -> None:
        if len(tokens):
            self.buffer.append(np.asarray(tokens, dtype=self.dtype))
            self.buffered += len(tokens)
            self.tokens += len(tokens)
        self.bytes += n_bytes
        if self.buffered >= self.shard_tokens:
            self._flush(final=False)

    def append_stream(self, tokens: np.ndarray, starts: list[int], n_bytes: int) -> None:
        """Append tokens cut from another split; `starts` are the document starts inside them.
        A piece that begins mid-document counts as a document of its own."""
        starts = starts if starts and starts[0] == 0 else [0] + list(starts)
        self.doc_starts.extend(self.tokens + s for s in starts)
        self.documents += len(starts)
        self.write(tokens, n_bytes)

    def _flush(self, final: bool) -> None:
        if self.buffer:
            data = np.concatenate(self.buffer)
            cut = len(data) if final else len(data) - len(data) % self.shard_tokens
            for start in range(0, cut, self.shard_tokens):
                piece = data[start:min(start + self.shard_tokens, cut)]
                piece.tofile(self.folder / shard_name(self.split, len(self.shards)))
                self.shards.append(len(piece))
            rest = data[cut:]
            self.buffer, self.buffered = ([rest], len(rest)) if len(rest) else ([], 0)
        if self.doc_starts:
            with open(self.doc_path, "ab") as f:
                np.asarray(self.doc_starts, dtype=DOC_INDEX_DTYPE).tofile(f)
            self.doc_starts = []

    def finish(self) -> dict:
        self._flush(final=True)
        if not self.doc_path.exists():
            self.doc_path.touch()
        return {"shards": [{"file": shard_name(self.split, i), "tokens": n} for i, n in enumerate(self.shards)],
                "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "doc_index": self.doc_path.name}

    def take_tail(self, n: int) -> tuple[np.ndarray, list[int]]:
        """Remove the last `n` tokens (after `finish`) and return them with the offsets,
        relative to the tail, of the documents that started inside it."""
        assert not self.buffer and not self.doc_starts, "finish() first"
        cut = self.tokens - n
        tail = TokenStream(self.folder, [(shard_name(self.split, i), c) for i, c in enumerate(self.shards)],
                           self.dtype).read(cut, n).copy()
        # Shrink the shard files from the end.
        while self.shards and sum(self.shards[:-1]) >= cut:
            os.remove(self.folder / shard_name(self.split, len(self.shards) - 1))
            self.shards.pop()
        if self.shards:
            keep = cut - sum(self.shards[:-1])
            os.truncate(self.folder / shard_name(self.split, len(self.shards) - 1), keep * self.dtype.itemsize)
            self.shards[-1] = keep
        self.tokens = cut
        starts = read_doc_starts(self.doc_path)
        keep_docs = int(np.searchsorted(starts, cut, side="left"))
        moved = [int(s) - cut for s in starts[keep_docs:]]
        del starts  # release the map before shrinking its file
        os.truncate(self.doc_path, keep_docs * DOC_INDEX_DTYPE.itemsize)
        self.documents = keep_docs
        return tail, moved


class TokenStream:
    """Several shard files read as one sequence of tokens (memory-mapped, never loaded)."""

    def __init__(self, folder: Path, shards: list[tuple[str, int]], dtype: np.dtype):
        self.maps = [np.memmap(Path(folder) / name, dtype=dtype, mode="r", shape=(count,))
                     for name, count in shards if count > 0]
        self.offsets = [0]
        for m in self.maps:
            self.offsets.append(self.offsets[-1] + len(m))

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n), a view when they lie in one shard, else a copy."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"read({start}, {n}) outside a stream of {len(self)} tokens")
        i = bisect.bisect_right(self.offsets, start) - 1
        if n == 0:
            return np.empty(0, dtype=self.maps[0].dtype if self.maps else np.uint16)
        local = start - self.offsets[i]
        if local + n <= len(self.maps[i]):
            return self.maps[i][local:local + n]
        parts = []
        while n > 0:
            take = min(n, len(self.maps[i]) - local)
            parts.append(self.maps[i][local:local + take])
            n -= take
            i, local = i + 1, 0
        return np.concatenate(parts)


def read_doc_starts(path: Path) -> np.ndarray:
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=DOC_INDEX_DTYPE)
    return np.memmap(path, dtype=DOC_INDEX_DTYPE, mode="r")
