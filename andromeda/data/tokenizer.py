"""Tokenizers behind one small interface, saved with data and inside every checkpoint.

- `ByteTokenizer`: UTF-8 bytes 0..255 plus an end-of-text id 256 (no training, no files).
- `CharTokenizer`: one id per character seen in the corpus (nanoGPT's shakespeare_char),
  plus an end-of-text id.
- `HFTokenizer`: any Hugging Face `tokenizer.json` (BPE trained here with `tokenizers`, or
  one imported from a model folder); encodes exactly as the `tokenizers` library does.
- `SentencePieceTokenizer`: a SentencePiece `.model` file (needs the optional `sentencepiece`).
- `train_bpe(texts, vocab_size)`: a byte-level BPE (GPT-2 style) with an end-of-text token.
- `tokenizer_from_path(path)`: a tokenizer.json, a folder holding one, or a .model file.

`tokenizer.spec()` is the JSON stored in checkpoint config.json; `tokenizer.save(folder)`
writes any files the spec names; `load_tokenizer(spec, folder)` inverts both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from andromeda.errors import UserError


class Tokenizer:
    kind = "base"
    vocab_size: int
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    add_bos: bool = False
    """Whether a text the model reads starts with `bos_id` (Llama's and Mistral's tokenizers
    add it; the byte, char and BPE tokenizers trained here separate documents with EOS)."""

    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone: no special tokens (data preparation joins documents itself)."""
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a model reads for a prompt: BOS first exactly when the tokenizer adds it, as
        transformers' `tokenizer(text)` does. Every prompt (generate, chat, serve, SFT) goes
        through here, so all agree with each other and with the model's own tokenizer."""
        ids = self.encode(text)
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

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

    def __init__(self, tok, eos_token: Optional[str] = None, bos_token: Optional[str] = None,
                 add_bos: Optional[bool] = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.add_bos = self._post_processor_adds_bos() if add_bos is None else bool(add_bos)

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor puts BOS before a text (what transformers
        applies with add_special_tokens=True): the tokenizer's own rule, read from the file."""
        if self.bos_id is None:
            return False
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    @classmethod
    def from_file(cls, path: Path, eos_token: Optional[str] = None, bos_token: Optional[str] = None,
                  add_bos: Optional[bool] = None):
        from tokenizers import Tokenizer as _HFTok
        try:
            tok = _HFTok.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise UserError(f"cannot read tokenizer {path}: {e}") from None
        return cls(tok, eos_token, bos_token, add_bos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def bytes_of(self, ids: Sequence[int]) -> int:
        # Special tokens (end-of-text) stand for no text, so they count no bytes.
        return len(self.tok.decode(list(ids), skip_special_tokens=True).encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (the library spreads them over threads)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def spec(self) -> dict:
        return {"kind": "hf", "file": self.FILE, "eos_token": self.eos_token, "bos_token": self.bos_token,
                "add_bos": self.add_bos}

    def save(self, folder: Path) -> None:
        self.tok.save(str(Path(folder) / self.FILE))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Kudo & Richardson, 2018), kept as its serialized proto so the
    saved copy is byte-identical to the file it was loaded from."""

    kind = "sentencepiece"
    FILE = "tokenizer.model"

    def __init__(self, proto: bytes):
        try:
            import sentencepiece as spm
        except ImportError:
            raise UserError("SentencePiece .model files need the optional package: "
                            "pip install sentencepiece") from None
        self.proto = proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # the library raises RuntimeError/OSError with C++ messages
            raise UserError(f"cannot read SentencePiece model: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @classmethod
    def from_file(cls, path: Path) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "file": self.FILE}

    def save(self, folder: Path) -> None:
        (Path(folder) / self.FILE).write_bytes(self.proto)


EOT_TOKEN = "<|endoftext|>"
# Names that end a document in common tokenizer.json files, tried when no
# tokenizer_config.json sits beside the file to say which one it is.
_EOS_NAMES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")


def train_bpe(texts, vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2's scheme, Radford et al. 2019) on an iterable of texts.

    Byte-level means every string is encodable (no unknown token); `<|endoftext|>` is the
    only special token and ends documents."""
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise UserError(f"bpe vocab size must be at least {len(alphabet) + 1} "
                        f"(256 byte symbols + end-of-text), got {vocab_size}")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOT_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:  # the trainer stops early when no pair repeats min_frequency times
        print(f"bpe:{vocab_size}: the data supports only {got - len(alphabet) - 1} merges (pairs seen at least "
              f"{min_frequency} times), so the tokenizer has {got} ids, not {vocab_size}", file=sys.stderr)
    return HFTokenizer(tok, eos_token=EOT_TOKEN)


def _eos_token_of(path: Path, tok) -> Optional[str]:
    config = path.parent / "tokenizer_config.json"
    if config.exists():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except json.JSONDecodeError:
            eos = None
        if isinstance(eos, dict):  # older configs store an AddedToken dict
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    return next((name for name in _EOS_NAMES if tok.token_to_id(name) is not None), None)


def tokenizer_from_path(path) -> Tokenizer:
    """Load an existing tokenizer: tokenizer.json (or a folder holding one) or a
    SentencePiece .model file. The end-of-text token comes from tokenizer_config.json
    beside the file, else from common names; a tokenizer without one is refused because
    documents are joined with it."""
    path = Path(path)
    if path.is_dir():
        path = path / HFTokenizer.FILE
    if not path.exists():
        raise UserError(f"tokenizer file not found: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer.from_file(path)
    if path.suffix != ".json":
        raise UserError(f"unknown tokenizer file {path}: expected a tokenizer.json or a SentencePiece .model")
    probe = HFTokenizer.from_file(path)
    eos = _eos_token_of(path, probe.tok)
    if eos is None:
        raise UserError(f"{path} has no end-of-text token (tried tokenizer_config.json and "
                        f"{', '.join(_EOS_NAMES)}); documents are joined with one")
    return HFTokenizer(probe.tok, eos_token=eos)


def load_tokenizer(spec: dict, folder: Optional[Path] = None) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(spec["chars"]))
    if kind == "hf":
        path = _tokenizer_file(spec, folder, HFTokenizer.FILE)
        # Specs written before `add_bos` was recorded read the rule from the tokenizer file.
        return HFTokenizer.from_file(path, spec.get("eos_token"), spec.get("bos_token"), spec.get("add_bos"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_file(_tokenizer_file(spec, folder, SentencePieceTokenizer.FILE))
    raise UserError(f"unknown tokenizer kind {kind!r} in {json.dumps(spec)[:200]}")


def _tokenizer_file(spec: dict, folder: Optional[Path], default: str) -> Path:
    """The file a file-backed tokenizer spec names, inside `folder`."""
    if folder is None:
        raise UserError(f"a {spec['kind']} tokenizer spec needs the folder that holds its {default}")
    path = Path(folder) / spec.get("file", default)
    if not path.exists():
        raise UserError(f"tokenizer file missing: {path}")
    return path
