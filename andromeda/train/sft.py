"""Instruction tuning data: JSONL records -> token ids with a loss mask -> batches.

Offers `read_sft_records(path)` (validated message lists; errors name the line),
`encode_example(rendered, tokenizer, max_len)`, `load_sft(path, tokenizer, seq_len)` (train
and validation examples) and `SFTLoader`, which has the pretraining loader's interface
(`next_batch() -> (x, y, doc_ids or None)`, `state_dict()`, `load_state_dict()`).

Two record shapes are accepted, one per line:
- Dolly style: {"instruction": ..., "context": ... (optional), "response": ...}
- chat: {"messages": [{"role": "user"|"system"|"assistant", "content": ...}, ...]}

Targets outside assistant responses are IGNORE (-100), so only response tokens carry loss.
Each piece of the rendered text is tokenized on its own, cut at the span borders: the prompt
is then tokenized exactly as it is at inference, when it is encoded alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from andromeda.data.chat_template import Rendered, instruction_messages, render_chat
from andromeda.data.tokenizer import Tokenizer
from andromeda.errors import UserError

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    loss: list[bool]
    """loss[i]: token i is a target that carries loss (it is part of an assistant response)."""


def _record_messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise UserError(f"{where}: 'messages' has no assistant message to learn from")
        return messages
    missing = [k for k in ("instruction", "response") if k not in record]
    if missing:
        raise UserError(f"{where}: record has no {' or '.join(repr(m) for m in missing)}; expected "
                        "Dolly-style {instruction, context, response} or chat {messages: [{role, content}]}")
    fields = {k: record.get(k, "") for k in ("instruction", "context", "response")}
    bad = [k for k, v in fields.items() if not isinstance(v, str)]
    if bad:
        raise UserError(f"{where}: field {bad[0]!r} must be a string")
    return instruction_messages(fields["instruction"], fields["context"] or "", fields["response"])


def read_sft_records(path: Path) -> list[list[dict]]:
    """Every non-empty line of `path` as a list of chat messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SFT data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            messages = _record_messages(record, where)
            try:
                render_chat(messages)
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
            records.append(messages)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def encode_example(rendered: Rendered, tokenizer: Tokenizer, max_len: int) -> Example:
    """Token ids of the rendered text (BOS first when the tokenizer adds it, as for prompts:
    `Tokenizer.encode_prompt`), truncated to `max_len`, with the loss flag of each token."""
    ids: list[int] = tokenizer.encode_prompt("")
    loss: list[bool] = [False] * len(ids)
    for piece, is_response in rendered.segments():
        piece_ids = tokenizer.encode(piece)
        ids += piece_ids
        loss += [is_response] * len(piece_ids)
    return Example(ids[:max_len], loss[:max_len])


def load_sft(path: Path, tokenizer: Tokenizer, seq_len: int,
             val_fraction: float = 0.05) -> tuple[list[Example], list[Example]]:
    """Encode every record (examples longer than seq_len + 1 tokens are cut at the end) and
    hold out the last `val_fraction` of them (none for files under 20 records)."""
    records = read_sft_records(path)
    examples, dropped = [], 0
    for messages in records:
        example = encode_example(render_chat(messages), tokenizer, seq_len + 1)
        if any(example.loss[1:]):
            examples.append(example)
        else:  # the response starts past the cut
            dropped += 1
    if not examples:
        raise UserError(f"{path}: no record has response tokens within train.seq_len={seq_len}; "
                        "raise train.seq_len")
    if dropped:
        print(f"sft: {dropped} of {len(records)} records have no response within {seq_len} tokens; skipped")
    n_val = int(len(examples) * val_fraction) if len(examples) >= 20 else 0
    return examples[: len(examples) - n_val], examples[len(examples) - n_val:]


class SFTLoader:
    """Batches of examples in a seeded shuffled order, epoch after epoch.

    Padding (default): one example per row, rows padded to the longest in the batch.
    Packing: examples laid end to end in rows of seq_len + 1 tokens, with document ids so
    that attention stays inside each example.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, seed: int,
                 pack: bool = False, device="cpu", pad_id: int = 0):
        if not examples:
            raise UserError("no SFT examples to train on")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.seed, self.pack, self.device, self.pad_id = seed, pack, torch.device(device), pad_id
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _next_example(self) -> Example:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        example = self.examples[self._order[self.cursor]]
        self.cursor += 1
        return example

    def _peek(self) -> Example:
        """The example `_next_example` would return, without consuming it."""
        if self.cursor == len(self._order):
            return self.examples[self._permutation(self.epoch + 1)[0]]
        return self.examples[self._order[self.cursor]]

    def next_batch(self):
        rows = self._packed_rows() if self.pack else self._padded_rows()
        width = max(len(ids) for ids, _, _ in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        docs = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (ids, loss, doc) in enumerate(rows):
            n = len(ids)
            tokens[r, :n] = torch.tensor(ids)
            keep = torch.tensor(loss, dtype=torch.bool)
            targets[r, :n] = torch.where(keep, torch.tensor(ids), IGNORE)
            docs[r, :n] = torch.tensor(doc)
        # Padding gets its own document so that packed rows never attend to it.
        docs[docs < 0] = docs.max() + 1
        x, y = tokens[:, :-1], targets[:, 1:].clone()
        doc_x = docs[:, :-1]
        y[docs[:, 1:] != doc_x] = IGNORE  # never predict across a document border
        to = dict(device=self.device, non_blocking=True)
        return x.to(**to), y.to(**to), (doc_x.to(**to) if self.pack else None)

    def _padded_rows(self):
        rows = []
        for _ in range(self.batch_size):
            e = self._next_example()
            rows.append((e.ids, e.loss, [0] * len(e.ids)))
        return rows

    def _packed_rows(self):
        rows, width = [], self.seq_len + 1
        for _ in range(self.batch_size):
            ids, loss, doc = [], [], []
            while True:
                e = self._next_example()
                ids += e.ids
                loss += e.loss
                doc += [len(set(doc))] * len(e.ids)
                if len(ids) + len(self._peek().ids) > width:
                    break
            rows.append((ids, loss, doc))
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def sft_val_loader(examples: list[Example], batch_size: int, seq_len: int, pack: bool,
                   device) -> Optional[SFTLoader]:
    """A fresh loader over the held-out examples with a fixed order (same batches each pass)."""
    return SFTLoader(examples, batch_size, seq_len, seed=0, pack=pack, device=device) if examples else None
