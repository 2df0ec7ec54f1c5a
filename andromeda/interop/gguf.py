"""GGUF export: an andromeda checkpoint as a file llama.cpp (and the tools built on it) runs.

- `export_gguf(model, tokenizer, out, qtype="f32", overwrite=False) -> dict`: write `out`
  atomically (a temporary file, then rename) with the `gguf` package, llama.cpp's own writer.
- `gguf_tokenizer(tokenizer) -> GGUFVocab`: the tokenizer as GGUF vocabulary keys.
- `CHAT_TEMPLATE`: andromeda's chat template (andromeda/data/chat_template.py) in Jinja, the
  language GGUF's `tokenizer.chat_template` key is read in.
- `QTYPES`: the weight types offered (f32, f16, q8_0, q4_0).

The model must be Llama-shaped (`config_to_hf` decides, so --to-hf and --to-gguf accept the
same set), and beyond that without biases, sliding window, GEGLU or YaRN/Llama-3 RoPE scaling,
which llama.cpp's `llama` graph does not read back the way andromeda computes them. Anything
else is refused naming the field.

RoPE layout: andromeda and transformers rotate the two halves of each head (rotate-half);
llama.cpp's `llama` graph rotates adjacent pairs. So the rows of every q and k head are
reordered [0, h, 1, h+1, ...] (h = head_dim / 2), the convention llama.cpp's converter uses.

Tokenizers, all written as llama.cpp's byte-level BPE ("gpt2" model, GPT-2 pre-tokenizer),
chosen because it reproduces andromeda's ids exactly for every text:
- byte: 256 tokens, one per byte (in GPT-2's byte->printable mapping), no merges that can
  fire, so every byte is its own token; end-of-text is a control token.
- char: one token per character; a multi-byte UTF-8 character is built from its bytes by
  merges that cannot cross a character boundary (a merge's right side is always a
  continuation byte, its left side starts with a lead byte).
- BPE from tokenizer.json: vocabulary and merges as they are, when the file is a plain
  byte-level BPE (no normalizer, ByteLevel pre-tokenizer with the GPT-2 regex, no prefix
  space); other tokenizer.json files and SentencePiece models are refused.
llama.cpp needs a merges key, so byte and char vocabularies carry one merge of a letter and
a digit, which GPT-2's pre-tokenizer never puts in one word, so it never fires.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from andromeda.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer
from andromeda.errors import UserError
from andromeda.interop.hf import config_to_hf
from andromeda.interop.hf_weights import state_to_hf
from andromeda.model.config import ModelConfig

QTYPES = ("f32", "f16", "q8_0", "q4_0")
# The one chat template (andromeda/data/chat_template.py), in the Jinja that GGUF readers render.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NEVER_FIRING_MERGE = "a 0"  # a letter then a digit: never inside one GPT-2 pre-token


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the optional package: pip install gguf") from None
    return gguf


def _refuse(what: str) -> None:
    raise UserError(f"cannot export to GGUF (llama.cpp 'llama'): {what}")


def check_gguf_config(cfg: ModelConfig) -> None:
    """Refuse, naming the field, what the GGUF `llama` architecture cannot express."""
    try:
        config_to_hf(cfg)
    except UserError as e:
        _refuse(str(e).split(": ", 1)[-1])
    p, a = cfg.position, cfg.attention
    if p.rope_scaling not in ("none", "linear"):
        _refuse(f"position.rope_scaling={p.rope_scaling!r} (supported: 'none', 'linear')")
    if a.window is not None:
        _refuse(f"attention.window={a.window} (llama.cpp's llama graph attends to the whole context)")
    if a.bias or cfg.mlp.bias:
        _refuse("attention.bias / mlp.bias must be false")
    if cfg.mlp.kind != "swiglu":
        _refuse(f"mlp.kind={cfg.mlp.kind!r} (needs 'swiglu')")
    if cfg.head_dim % 2:
        _refuse(f"head_dim={cfg.head_dim} must be even for RoPE")


# ---------------------------------------------------------------- tokenizer
@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: Optional[int]
    bos_id: Optional[int] = None
    add_bos: bool = False
    notes: list[str] = field(default_factory=list)


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (Radford et al. 2019, encoder.py), the alphabet
    byte-level BPE writes tokens in: printable Latin-1 bytes stand for themselves, the rest
    (controls, space, ...) for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def _char_vocab(tok: CharTokenizer, table: list[str]) -> tuple[list[str], list[str]]:
    tokens, merges = [], []
    for ch in tok.chars:
        pieces = [table[b] for b in ch.encode("utf-8")]
        tokens.append("".join(pieces))
        for i in range(1, len(pieces)):  # build a multi-byte character left to right
            merge = f"{''.join(pieces[:i])} {pieces[i]}"
            if merge not in merges:
                merges.append(merge)
    return tokens, merges


def _hf_vocab(tok: HFTokenizer) -> tuple[list[str], list[int], list[str]]:
    spec = json.loads(tok.tok.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or norm is not None or pre.get("type") != "ByteLevel" \
            or not pre.get("use_regex", True) or pre.get("add_prefix_space") or model.get("dropout") \
            or model.get("ignore_merges"):
        raise UserError("cannot export this tokenizer.json to GGUF: only a plain byte-level BPE (ByteLevel "
                        "pre-tokenizer with the GPT-2 regex, no normalizer, no prefix space) has an exact "
                        "llama.cpp equivalent; pass --no-tokenizer to export the weights only")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(3 if i in special else (1 if i in by_id else 5))  # CONTROL, NORMAL, UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges or [NEVER_FIRING_MERGE]


def gguf_tokenizer(tok: Tokenizer) -> GGUFVocab:
    """GGUF vocabulary keys that make llama.cpp tokenize exactly as `tok` does."""
    table = _byte_chars()
    if isinstance(tok, ByteTokenizer):
        tokens, merges = list(table), [NEVER_FIRING_MERGE]
        return GGUFVocab(tokens + ["<|endoftext|>"], [1] * 256 + [3], merges, eos_id=tok.eos_id)
    if isinstance(tok, CharTokenizer):
        tokens, merges = _char_vocab(tok, table)
        return GGUFVocab(tokens + ["<|endoftext|>"], [1] * len(tokens) + [3], merges or [NEVER_FIRING_MERGE],
                         eos_id=tok.eos_id)
    if isinstance(tok, HFTokenizer):
        tokens, types, merges = _hf_vocab(tok)
        return GGUFVocab(tokens, types, merges, eos_id=tok.eos_id, bos_id=tok.bos_id, add_bos=tok.add_bos)
    raise UserError(f"cannot export a {tok.kind!r} tokenizer to GGUF (byte, char and byte-level BPE tokenizers "
                    "can be); pass --no-tokenizer to export the weights only")


# ---------------------------------------------------------------- weights
def rope_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k reordered from rotate-half to adjacent-pair RoPE, head by head."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor (llama.cpp's `llama` layout) for a Llama-shaped model."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.depth)
    out = {}
    for hf_name, t in state_to_hf(model.state_dict(), cfg).items():
        t = t.detach().to(torch.float32).cpu()
        if hf_name.endswith("q_proj.weight"):
            t = rope_pairs(t, cfg.attention.heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rope_pairs(t, cfg.attention.kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AssertionError(f"no GGUF name for {hf_name}")
        out[name] = t.contiguous()
    return out


def _encode(gguf, name: str, t: torch.Tensor, qtype: str):
    """(data, raw_dtype) for one tensor: 1-D tensors (norms) stay float32 as llama.cpp keeps
    them; a 2-D tensor whose rows do not split into quantisation blocks falls back to f16."""
    a = t.numpy()
    if a.ndim == 1 or qtype == "f32":
        return a.astype(np.float32), None, "f32"
    if qtype == "q8_0" or qtype == "q4_0":
        q = gguf.GGMLQuantizationType.Q8_0 if qtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        block = gguf.GGML_QUANT_SIZES[q][0]
        if a.shape[-1] % block == 0:
            return gguf.quants.quantize(a.astype(np.float32), q), q, qtype
    return a.astype(np.float16), None, "f16"


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama_ftype values


def export_gguf(model, tokenizer: Optional[Tokenizer], out: Path, qtype: str = "f32",
                overwrite: bool = False, name: str = "andromeda") -> dict:
    """Write `model` (and `tokenizer`, with the chat template) as a GGUF file; returns a summary."""
    gguf = _gguf()
    cfg = model.cfg
    check_gguf_config(cfg)
    if qtype not in QTYPES:
        raise UserError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(QTYPES)}")
    vocab = gguf_tokenizer(tokenizer) if tokenizer is not None else None
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    tensors = gguf_tensors(model, cfg)  # everything that can fail runs before a byte is written

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    written: dict[str, str] = {}
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        _write_header(w, cfg, qtype, name)
        if vocab is not None:
            _write_vocab(w, vocab, cfg.vocab_size)
        for tname, t in tensors.items():
            data, raw, kind = _encode(gguf, tname, t, qtype)
            w.add_tensor(tname, data, raw_dtype=raw)
            written[tname] = kind
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"out": str(out), "type": qtype, "architecture": "llama", "tensors": len(written),
            "tensor_types": sorted(set(written.values())), "tokenizer": vocab is not None,
            "bytes": out.stat().st_size}


def _write_header(w, cfg: ModelConfig, qtype: str, name: str) -> None:
    a, p = cfg.attention, cfg.position
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.depth)
    w.add_feed_forward_length(cfg.mlp.resolved_hidden(cfg.dim))
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(p.rope_theta))
    if p.rope_scaling == "linear":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(p.rope_factor))
    w.add_layer_norm_rms_eps(float(cfg.norm.eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPES[qtype])
    if qtype.startswith("q"):
        w.add_quantization_version(2)


def _write_vocab(w, vocab: GGUFVocab, n_vocab: int) -> None:
    tokens, types = list(vocab.tokens), list(vocab.types)
    if len(tokens) > n_vocab:
        raise UserError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):  # the embedding has padding rows: unused tokens
        tokens.append(f"[PAD{i}]")
        types.append(5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    w.add_add_bos_token(bool(vocab.add_bos and vocab.bos_id is not None))
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
