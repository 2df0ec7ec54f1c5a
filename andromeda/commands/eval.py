"""Loss, perplexity and bits per byte of a checkpoint on held-out text.

--data is a text file, a folder of text, JSONL/Parquet, or a prepared data folder (its val
split). Every token after the first is scored once: windows of --seq-len tokens that do not
overlap, or with --stride S a sliding window that scores only its last S tokens.

Each document of a text source starts with the token the model expects before a text: BOS
when its tokenizer adds one (imported Llama-style models), else EOS, the separator `prepare`
puts between training documents. The output says which; --doc-start picks the other.

examples:
  andromeda eval --ckpt runs/shk/checkpoints/best --data data/shk
  andromeda eval --ckpt ckpt --data held_out.txt --seq-len 512 --stride 256 --json
  andromeda eval --ckpt ckpt --data held_out.txt --lengths 256,512,1024 --json
  andromeda eval --ckpt ckpt --data held_out.txt --lengths 256,512,1024,2048,4096 --plot len.png

--lengths L1,L2,... scores the same target tokens at every length (sliding windows; see
andromeda/eval/lengths.py) and prints one row per length.
"""

from __future__ import annotations

import json
import sys

import torch

from andromeda.checkpoint import load_checkpoint
from andromeda.devices import resolve_device
from andromeda.errors import UserError
from andromeda.eval.lengths import check_plot_path, evaluate_lengths, plot_lengths
from andromeda.eval.perplexity import DOC_STARTS, evaluate, load_eval_tokens


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--data", required=True, metavar="PATH", help="text file/folder or prepared data folder")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the model's max_seq_len, capped by the data size)")
    p.add_argument("--stride", type=int, default=None,
                   help="score only the last STRIDE tokens of each window (default: seq-len, no overlap)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--split", default="val", help="split of a prepared data folder (default: val)")
    p.add_argument("--doc-start", choices=DOC_STARTS, default="auto",
                   help="token before each document of a text source: bos, eos or none (default auto: bos when "
                        "the tokenizer adds it, else eos)")
    p.add_argument("--doc-mask", action="store_true", help="mask attention across document boundaries")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: as stored)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--lengths", default=None, metavar="L1,L2,...",
                   help="loss at each context length on the same targets (--stride defaults to half the shortest)")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="with --lengths: measure lengths beyond max_seq_len even without rope scaling")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="with --lengths: also write loss against length as a PNG (needs matplotlib)")


def run(args) -> int:
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    for flag, value in (("--seq-len", args.seq_len), ("--stride", args.stride), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:  # 0 is not a shorthand for the default: leave the flag out
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.plot is not None and args.lengths is None:
        raise UserError("--plot draws the --lengths curve; add --lengths L1,L2,...")
    if args.plot is not None:
        check_plot_path(args.plot)
    model, tokenizer, _ = load_checkpoint(args.ckpt, device=device, dtype=dtype)
    if tokenizer is None:
        raise UserError(f"checkpoint {args.ckpt} has no tokenizer; cannot read text for it")
    data = load_eval_tokens(args.data, tokenizer, args.split, args.doc_start)
    if args.lengths is not None:
        return _run_lengths(args, model, data)
    seq_len = args.seq_len if args.seq_len is not None else min(model.cfg.max_seq_len, data.length - 1)
    result = evaluate(model, tokenizer, data, seq_len, args.batch_size, stride=args.stride, doc_mask=args.doc_mask)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"bits/byte {result['bits_per_byte']:.4f}  tokens {result['tokens']:,}  (seq_len {seq_len})")
        other = "eos" if data.doc_start == "bos" else "bos"
        print(f"each document starts with {data.doc_start.upper()}"
              + (f" (--doc-start {other} for the other convention)" if getattr(tokenizer, f"{other}_id") is not None
                 else ""), file=sys.stderr)
    return 0


def _run_lengths(args, model, data) -> int:
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths takes comma-separated integers, got {args.lengths!r}") from None
    rows = evaluate_lengths(model, data, lengths, stride=args.stride, allow_extrapolation=args.allow_extrapolation)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'length':>8} {'loss':>8} {'perplexity':>11} {'tokens':>8}")
        for r in rows:
            print(f"{r['length']:>8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['tokens']:>8}")
    if args.plot:
        path = plot_lengths({str(args.ckpt): rows}, args.plot, title=f"{args.ckpt}: loss against context length")
        print(f"plot written to {path}", file=sys.stderr)
    return 0
