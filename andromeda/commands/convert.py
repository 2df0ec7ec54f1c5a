"""Convert between Hugging Face model folders and andromeda checkpoints.

  andromeda convert --from-hf HF_DIR --out CKPT_DIR [--dtype float32|bfloat16|float16]
  andromeda convert --to-hf CKPT_DIR --out HF_DIR [--dtype ...]
  andromeda convert --to-gguf CKPT_DIR --out FILE.gguf [--type f32|f16|q8_0|q4_0]

--from-hf reads a `save_pretrained` folder of LlamaForCausalLM, MistralForCausalLM or
Qwen2ForCausalLM: config.json, safetensors weights (single file or sharded; never pickle) and
tokenizer.json. --to-hf writes a Llama (or, with a sliding window, Mistral) folder that
transformers' `from_pretrained` loads. --to-gguf writes one GGUF file for llama.cpp (the same
Llama-shaped models, tokenizer and chat template embedded; see andromeda/interop/gguf.py).
The output folder or file is written atomically: a failure
leaves no partial folder, and an existing one is kept unless --overwrite is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from andromeda.errors import UserError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face save_pretrained folder to import")
    src.add_argument("--to-hf", metavar="CKPT_DIR", help="andromeda checkpoint to export as a Hugging Face folder")
    src.add_argument("--to-gguf", metavar="CKPT_DIR", help="andromeda checkpoint to export as a GGUF file (llama.cpp)")
    p.add_argument("--out", required=True, metavar="DIR|FILE", help="folder (or, with --to-gguf, .gguf file) to write")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weight dtype to write (default: the dtype the source weights are stored in)")
    p.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default=None,
                   help="--to-gguf weight type (default f32): f32, f16, or llama.cpp's block formats q8_0 "
                        "(8-bit, 32 weights a block) and q4_0 (4-bit); norms stay f32")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="convert the model only, without its tokenizer (e.g. for folders without tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _from_hf(args) -> dict:
    from andromeda.checkpoint import save_checkpoint
    from andromeda.interop.hf import import_hf

    imported = import_hf(Path(args.from_hf), DTYPES.get(args.dtype), with_tokenizer=not args.no_tokenizer)
    info = imported.info
    meta = {"source": "huggingface", "architecture": info["architecture"], "dtype": info["dtype"]}
    save_checkpoint(Path(args.out), imported.model, imported.tokenizer, meta=meta)
    return {**imported.info, "out": str(args.out)}


def _to_hf(args) -> dict:
    from andromeda.checkpoint import load_checkpoint
    from andromeda.interop.hf import export_hf
    from andromeda.interop.hf_weights import SafetensorsFolder

    model, tokenizer, _ = load_checkpoint(Path(args.to_hf))
    # load_checkpoint computes in float32; keep the stored dtype unless asked otherwise.
    dtype = DTYPES.get(args.dtype) or SafetensorsFolder(Path(args.to_hf)).dtype()
    return export_hf(model, None if args.no_tokenizer else tokenizer, Path(args.out), dtype,
                     overwrite=args.overwrite)


def _to_gguf(args) -> dict:
    from andromeda.checkpoint import load_checkpoint
    from andromeda.interop.gguf import check_gguf_config, export_gguf

    model, tokenizer, _ = load_checkpoint(Path(args.to_gguf), dtype=torch.float32)
    check_gguf_config(model.cfg)
    summary = export_gguf(model, None if args.no_tokenizer else tokenizer, Path(args.out),
                          args.gguf_type or "f32", overwrite=args.overwrite)
    return {**summary, "dtype": summary["type"]}


def run(args) -> int:
    if args.gguf_type and not args.to_gguf:
        raise UserError("--type applies to --to-gguf only (use --dtype for folders)")
    if args.dtype and args.to_gguf:
        raise UserError("--dtype applies to folders; for --to-gguf choose the weight type with --type")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    summary = _from_hf(args) if args.from_hf else _to_hf(args) if args.to_hf else _to_gguf(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['architecture']} ({summary['dtype']}) to {summary['out']}")
    return 0
