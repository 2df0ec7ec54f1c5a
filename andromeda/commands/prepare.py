"""Tokenize text into token shards with a train/val split, ready for `andromeda train`.

Inputs: text/markdown files, folders of them (searched recursively), JSON Lines (--field),
Parquet, `datasets.save_to_disk` folders, or a hub dataset written hf:NAME[:SPLIT]. With no
--data, the running Python's standard-library sources are used (works offline).

examples:
  andromeda prepare --data shakespeare.txt --tokenizer char --val-fraction 0.1 --out data/shk
  andromeda prepare --data corpus/ notes.jsonl --tokenizer bpe:8192 --doc-mask --out data/mix
  andromeda prepare --out data/stdlib --max-bytes 2000000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from andromeda.data.prepare import (
    DEFAULT_CORPUS_BYTES,
    DEFAULT_CORPUS_MIN_VAL_TOKENS,
    DEFAULT_VAL_FRACTION,
    META,
    SHARD_TOKENS,
    prepare,
    prepare_default_corpus,
)
from andromeda.errors import UserError

SMALL_VAL_TOKENS = 4096
"""Below this many validation tokens the summary suggests a larger split."""


def add_arguments(p) -> None:
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="files, folders, or hf:NAME[:SPLIT]; default: the Python standard library sources")
    p.add_argument("--field", default="text", help="JSONL/Parquet/datasets column holding the text (default: text)")
    p.add_argument("--tokenizer", default="byte", metavar="SPEC",
                   help="byte (default), char, bpe:N (train a byte-level BPE of N ids), "
                        "or a path to tokenizer.json / SentencePiece .model")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION}; "
                        "at least one document)")
    p.add_argument("--min-val-tokens", type=int, default=None,
                   help="move tokens from the end of training to validation until it holds this many "
                        f"(default 0; {DEFAULT_CORPUS_MIN_VAL_TOKENS} for the default corpus)")
    p.add_argument("--doc-mask", action="store_true",
                   help="mark the data for attention masking across document boundaries when training")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--max-bytes", type=int, default=None,
                   help=f"stop after this many bytes of text (default corpus: {DEFAULT_CORPUS_BYTES})")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation document choice")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds prepared data")
    p.add_argument("--json", action="store_true", help="print meta.json instead of a summary")


def run(args) -> int:
    if (Path(args.out) / META).exists() and not args.overwrite:
        raise UserError(f"{args.out} already holds prepared data; pass --overwrite to replace it "
                        "or choose another --out")
    common = dict(val_fraction=args.val_fraction, doc_mask=args.doc_mask, max_docs=args.max_docs,
                  shard_tokens=args.shard_tokens, seed=args.seed, progress=True)
    if args.data:
        meta = prepare(args.data, args.out, args.tokenizer, field=args.field, max_bytes=args.max_bytes,
                       min_val_tokens=args.min_val_tokens or 0, **common)
    else:
        meta = prepare_default_corpus(
            args.out, args.tokenizer, max_bytes=args.max_bytes or DEFAULT_CORPUS_BYTES,
            min_val_tokens=DEFAULT_CORPUS_MIN_VAL_TOKENS if args.min_val_tokens is None else args.min_val_tokens,
            **common)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if val["tokens"] < SMALL_VAL_TOKENS:
        # A single long document (a book, a code file) leaves validation with only the tail
        # val_fraction of it; a val loss over a few hundred tokens moves more between
        # evaluations than most changes a user wants to see.
        print(f"note: validation holds only {val['tokens']:,} tokens; for a steadier val loss pass "
              f"--val-fraction 0.1 or --min-val-tokens {DEFAULT_CORPUS_MIN_VAL_TOKENS}", file=sys.stderr)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"{meta['documents']} documents -> train {train['tokens']:,} tokens ({train['documents']} docs), "
          f"val {val['tokens']:,} tokens ({val['documents']} docs); tokenizer {meta['tokenizer']['kind']} "
          f"with {meta['vocab_size']} ids, {meta['dtype']}")
    print(args.out)
    return 0
