"""Batches of token windows from prepared data: deterministic, exactly resumable, prefetched.

- `TokenLoader(data, split, batch_size, seq_len, seed, doc_mask, device, ...)`:
  `next_batch() -> (x, y, doc_ids)` with x, y (B, L) int64 (y is x shifted by one token) and
  doc_ids (B, L) int32 or None; `state_dict()` / `load_state_dict()` resume exactly.
- `iter_eval_windows(data, split, seq_len, batch_size)`: the whole split once, in order.

Sampling: each epoch cuts the split into fixed windows of L + 1 tokens (neighbours share one
token, so every token is a target once per epoch), starting at an offset drawn per epoch so the
cut points move between epochs, and visits them in a shuffled order. Both depend only on
(seed, epoch), so the whole sampling state is two integers, the epoch and the position in it.
With `world_size` > 1 each step takes B * world_size windows and rank r keeps the r-th block
of B, so ranks never see the same window within an epoch.

Prefetching (`prefetch=N`) runs the same pure function of the state on a background thread
and queues up to N batches with the state that follows each; `state_dict()` reports the state
after the last batch handed out, so prefetching never changes what a resumed run sees.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional, Union

import numpy as np
import torch

from andromeda.data.prepare import PreparedData, open_prepared
from andromeda.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
STATE_VERSION = 1


def window_doc_ids(starts: np.ndarray, first: int, length: int) -> np.ndarray:
    """Document index (counted from 0 at the window's first token) of tokens
    [first, first + length) of a split whose documents start at `starts`."""
    positions = np.arange(first, first + length, dtype=np.int64)
    ids = np.searchsorted(starts, positions, side="right").astype(np.int64)
    return (ids - ids[0]).astype(np.int32)


class TokenLoader:
    def __init__(self, data: Union[str, PreparedData], split: str = "train", batch_size: int = 8,
                 seq_len: int = 256, seed: int = 0, doc_mask: Optional[bool] = False, device="cpu",
                 rank: int = 0, world_size: int = 1, prefetch: int = 0):
        """`doc_mask=None` follows the data (`prepare --doc-mask`); `prefetch` is how many
        batches a background thread keeps ready (0: build each batch on call)."""
        self.data = open_prepared(data)
        self.stream = self.data.split(split)
        self.starts = np.asarray(self.data.doc_starts[split], dtype=np.int64)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.doc_mask = bool(self.data.meta.get("doc_mask", False)) if doc_mask is None else doc_mask
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        if len(self.stream) < seq_len + 1:
            raise UserError(f"the {split} split has {len(self.stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                            "use a shorter sequence or more data (prepare --min-val-tokens for validation)")
        self.epoch, self.index = 0, 0
        self._epoch_cache: tuple[int, int, np.ndarray] = (-1, 0, np.empty(0, dtype=np.int64))
        self._pin = self.device.type == "cuda"
        self.prefetch = prefetch
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # Sampling: a pure function of (epoch, index).

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, shuffled window order) of one epoch."""
        if self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.stream)
            offset = int(rng.integers(0, min(self.seq_len, n - self.seq_len)))
            order = rng.permutation((n - 1 - offset) // self.seq_len)
            self._epoch_cache = (epoch, offset, order)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window_starts(self, epoch: int, index: int, count: int) -> tuple[list[int], int, int]:
        """Token offsets of the next `count` windows from (epoch, index), and the state after."""
        starts = []
        while len(starts) < count:
            offset, order = self._epoch_plan(epoch)
            take = order[index:index + count - len(starts)]
            starts.extend(offset + int(w) * self.seq_len for w in take)
            index += len(take)
            if index >= len(order):
                epoch, index = epoch + 1, 0
        return starts, epoch, index

    def _build(self, epoch: int, index: int) -> tuple[tuple[torch.Tensor, ...], int, int]:
        B, L = self.batch_size, self.seq_len
        starts, epoch, index = self._window_starts(epoch, index, B * self.world_size)
        mine = starts[self.rank * B:(self.rank + 1) * B]
        buf = np.stack([self.stream.read(s, L + 1) for s in mine]).astype(np.int64)  # (B, L+1)
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        tensors = (x, y)
        if self.doc_mask:
            tensors += (torch.from_numpy(np.stack([window_doc_ids(self.starts, s, L) for s in mine])),)
        if self._pin:
            tensors = tuple(t.pin_memory() for t in tensors)
        return tensors, epoch, index

    # Background prefetch: same function, same order, on a thread.

    def _producer(self, epoch: int, index: int) -> None:
        while not self._stop.is_set():
            item = self._build(epoch, index)
            _, epoch, index = item
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._producer, args=(self.epoch, self.index), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread (a later `next_batch` starts it again)."""
        if getattr(self, "_thread", None) is not None:  # also called from __del__ of a half-built loader
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def __del__(self):
        self.close()

    def next_batch(self) -> Batch:
        if self.prefetch > 0:
            if self._thread is None:
                self._start()
            tensors, self.epoch, self.index = self._queue.get()
        else:
            tensors, self.epoch, self.index = self._build(self.epoch, self.index)
        if self.device.type != "cpu":
            tensors = tuple(t.to(self.device, non_blocking=self._pin) for t in tensors)
        x, y = tensors[0], tensors[1]
        return x, y, (tensors[2] if self.doc_mask else None)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    # Resumption.

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "index": self.index, "seed": self.seed,
                "seq_len": self.seq_len, "split": self.split, "tokens": len(self.stream)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "split", "tokens"):
            if key in state and state[key] != mine[key]:
                raise UserError(f"data position was saved with {key}={state[key]!r} but this loader has "
                                f"{mine[key]!r}; resume with the same data, seed and sequence length")
        self.close()
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def iter_eval_windows(self, split: Optional[str] = None, seq_len: Optional[int] = None,
                          batch_size: Optional[int] = None) -> Iterator[Batch]:
        """`iter_eval_windows` on this loader's data, defaulting to its own settings."""
        return iter_eval_windows(self.data, split or "val", seq_len or self.seq_len, batch_size or self.batch_size,
                                 doc_mask=self.doc_mask, device=self.device)


def iter_eval_windows(data: Union[str, PreparedData], split: str = "val", seq_len: int = 256,
                      batch_size: int = 8, doc_mask: bool = False, device="cpu") -> Iterator[Batch]:
    """Consecutive windows over the whole split: window k holds tokens [kL, kL + L] and
    targets tokens kL+1 .. kL+L, so every token but the first is a target exactly once. The
    last window is shorter when the split does not divide evenly (it comes in a batch of its
    own)."""
    data = open_prepared(data)
    stream = data.split(split)
    starts = np.asarray(data.doc_starts[split], dtype=np.int64)
    n = len(stream)
    if n < 2:
        raise UserError(f"the {split} split has {n} tokens; at least 2 are needed to score one")
    device = torch.device(device)
    firsts = list(range(0, n - 1, seq_len))

    def make(group: list[int], length: int) -> Batch:
        buf = np.stack([stream.read(s, length + 1) for s in group]).astype(np.int64)
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        ids = torch.from_numpy(np.stack([window_doc_ids(starts, s, length) for s in group])) if doc_mask else None
        move = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
        return move(x), move(y), (move(ids) if ids is not None else None)

    full = [s for s in firsts if s + seq_len <= n - 1]
    for i in range(0, len(full), batch_size):
        yield make(full[i:i + batch_size], seq_len)
    if len(full) < len(firsts):
        last = firsts[-1]
        yield make([last], n - 1 - last)
