"""Tokenizers behind one small interface, saved with data and inside every checkpoint.

- `ByteTokenizer`: UTF-8 bytes 0..255 plus an end-of-text id 256 (no training, no files).
- `CharTokenizer`: one id per character seen in the corpus (nanoGPT's shakespeare_char),
  plus an end-of-text id.
- `HFTokenizer`: any Hugging Face `tokenizer.json` (BPE trained here with `tokenizers`, or
  one imported from a model folder); encodes exactly as the `tokenizers` library does.

`tokenizer.spec()` is the JSON stored in checkpoint config.json; `tokenizer.save(folder)`
writes any files the spec names; `load_tokenizer(spec, folder)` inverts both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from andromeda.errors import UserError


class Tokenizer:
    kind = "base"
    vocab_size: int
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write the files this tokenizer's spec refers to (none for byte/char)."""

    def bytes_of(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes the ids stand for (for bits-per-byte)."""
        return len(self.decode(ids).encode("utf-8"))


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def bytes_of(self, ids: Sequence[int]) -> int:
        return sum(1 for i in ids if 0 <= i < 256)

    def spec(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.eos_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this character-level vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids if 0 <= i < len(self.chars))

    def spec(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}


class HFTokenizer(Tokenizer):
    kind = "hf"
    FILE = "tokenizer.json"

    def __init__(self, tok, eos_token: Optional[str] = None, bos_token: Optional[str] = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None

    @classmethod
    def from_file(cls, path: Path, eos_token: Optional[str] = None, bos_token: Optional[str] = None):
        from tokenizers import Tokenizer as _HFTok
        try:
            tok = _HFTok.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise UserError(f"cannot read tokenizer {path}: {e}") from None
        return cls(tok, eos_token, bos_token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "hf", "file": self.FILE, "eos_token": self.eos_token, "bos_token": self.bos_token}

    def save(self, folder: Path) -> None:
        self.tok.save(str(Path(folder) / self.FILE))


def load_tokenizer(spec: dict, folder: Optional[Path] = None) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(spec["chars"]))
    if kind == "hf":
        if folder is None:
            raise UserError("an hf tokenizer spec needs the folder that holds its tokenizer.json")
        path = Path(folder) / spec.get("file", HFTokenizer.FILE)
        if not path.exists():
            raise UserError(f"tokenizer file missing: {path}")
        return HFTokenizer.from_file(path, spec.get("eos_token"), spec.get("bos_token"))
    if kind in _EXTRA_LOADERS:
        return _EXTRA_LOADERS[kind](spec, folder)
    raise UserError(f"unknown tokenizer kind {kind!r} in {json.dumps(spec)[:200]}")


# kind -> loader(spec, folder); for tokenizer kinds defined in other modules.
_EXTRA_LOADERS: dict = {}
