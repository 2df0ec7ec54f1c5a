"""Convert between Hugging Face model folders, x-transformers checkpoints and andromeda checkpoints.

  andromeda convert --from-hf HF_DIR --out CKPT_DIR [--dtype float32|bfloat16|float16]
  andromeda convert --to-hf CKPT_DIR --out HF_DIR [--dtype ...]
  andromeda convert --to-gguf CKPT_DIR --out FILE.gguf [--type f32|f16|q8_0|q4_0]
  andromeda convert --from-x-transformers FILE.pt --config FILE.json --out CKPT_DIR [--tokenizer byte|PATH]

--from-hf reads a `save_pretrained` folder of LlamaForCausalLM, MistralForCausalLM or
Qwen2ForCausalLM: config.json, safetensors weights (single file or sharded; never pickle) and
tokenizer.json. --to-hf writes a Llama (or, with a sliding window, Mistral) folder that
transformers' `from_pretrained` loads. --to-gguf writes one GGUF file for llama.cpp (the same
Llama-shaped models, tokenizer and chat template embedded; see andromeda/interop/gguf.py).
--from-x-transformers reads the `state_dict` of an
x-transformers 1.16 TransformerWrapper saved with torch.save (loaded with weights_only=True) and
its constructor arguments as JSON ({"num_tokens": ..., "attn_layers": {Decoder arguments}}); an
argument andromeda cannot reproduce is refused by name. The output folder or file is written
atomically: a failure leaves no partial output, and an existing one is kept unless --overwrite is given.
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
    src.add_argument("--to-hf", metavar="CKPT_DIR",
                     help="andromeda checkpoint (or training run folder) to export as a Hugging Face folder")
    src.add_argument("--to-gguf", metavar="CKPT_DIR", help="andromeda checkpoint to export as a GGUF file (llama.cpp)")
    src.add_argument("--from-x-transformers", metavar="FILE.pt",
                     help="x-transformers 1.16 TransformerWrapper state_dict (torch.save) to import; needs --config")
    p.add_argument("--config", metavar="FILE.json",
                   help="with --from-x-transformers: TransformerWrapper arguments, attn_layers holding the Decoder's")
    p.add_argument("--tokenizer", metavar="byte|PATH",
                   help="with --from-x-transformers: tokenizer to store with the model ('byte', or a tokenizer.json)")
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


def _from_xtransformers(args) -> dict:
    from andromeda.checkpoint import save_checkpoint
    from andromeda.data.tokenizer import ByteTokenizer, tokenizer_from_path
    from andromeda.interop.xtransformers import VERSION, import_xtransformers

    if not args.config:
        raise UserError("--from-x-transformers needs --config FILE.json (the model's constructor arguments)")
    tokenizer = None
    if args.tokenizer:
        tokenizer = ByteTokenizer() if args.tokenizer == "byte" else tokenizer_from_path(args.tokenizer)
    model = import_xtransformers(Path(args.from_x_transformers), Path(args.config), DTYPES.get(args.dtype))
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's num_tokens is "
                        f"{model.cfg.vocab_size}")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    architecture = f"x-transformers {VERSION} TransformerWrapper"
    meta = {"source": "x-transformers", "architecture": architecture, "dtype": dtype,
            "arguments": json.loads(Path(args.config).read_text())}
    save_checkpoint(Path(args.out), model, tokenizer, meta=meta)
    return {"architecture": architecture, "dtype": dtype, "out": str(args.out),
            "parameters": sum(p.numel() for p in model.parameters())}


def _to_hf(args) -> dict:
    from andromeda.checkpoint import checkpoint_folder, load_checkpoint
    from andromeda.interop.hf import export_hf
    from andromeda.interop.hf_weights import SafetensorsFolder

    source = checkpoint_folder(Path(args.to_hf))  # a run folder stands for its latest checkpoint
    model, tokenizer, _ = load_checkpoint(source)
    # load_checkpoint computes in float32; keep the stored dtype unless asked otherwise.
    dtype = DTYPES.get(args.dtype) or SafetensorsFolder(source).dtype()
    return export_hf(model, None if args.no_tokenizer else tokenizer, Path(args.out), dtype,
                     overwrite=args.overwrite)


def _to_gguf(args) -> dict:
    from andromeda.checkpoint import checkpoint_folder, load_checkpoint
    from andromeda.interop.gguf import check_gguf_config, export_gguf

    source = checkpoint_folder(Path(args.to_gguf))  # a run folder stands for its latest checkpoint
    model, tokenizer, _ = load_checkpoint(source, dtype=torch.float32)
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
    if (args.config or args.tokenizer) and not args.from_x_transformers:
        raise UserError("--config and --tokenizer go with --from-x-transformers")
    if args.from_x_transformers:
        summary = _from_xtransformers(args)
    else:
        summary = _from_hf(args) if args.from_hf else _to_hf(args) if args.to_hf else _to_gguf(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['architecture']} ({summary['dtype']}) to {summary['out']}")
    return 0
