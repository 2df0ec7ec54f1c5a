"""Held-out loss of a checkpoint in float32 and under each weight-only quantisation scheme.

Loads the float checkpoint once, quantises copies in memory (andromeda.quant.quantize_model)
and evaluates each on the same held-out tokens: int8, int4 at every group size, and the
choices for the head and the embedding (int4 head, float head, float embedding), so that the
defaults of `andromeda quantize` rest on measurements. Prints one row per variant with its
loss and its change against float32.

    .venv/bin/python benchmarks/quant_quality.py --ckpt RUN_OR_CKPT --data PREPARED_DIR_OR_TEXT [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from andromeda.checkpoint import load_checkpoint
from andromeda.eval.perplexity import evaluate, load_eval_tokens
from andromeda.quant.quantize import quantize_model

VARIANTS = [  # name, bits, group size, head, embedding
    ("int8", 8, None, "int8", "int8"),
    ("int8, float embedding", 8, None, "int8", "float"),
    ("int4 g32", 4, 32, "int8", "int8"),
    ("int4 g64", 4, 64, "int8", "int8"),
    ("int4 g128", 4, 128, "int8", "int8"),
    ("int4 g32, int4 head", 4, 32, "int4", "int8"),
    ("int4 g32, float head", 4, 32, "float", "int8"),
    ("int4 g32, float embedding", 4, 32, "int8", "float"),
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="prepared data folder (its val split) or a text file")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_checkpoint(args.ckpt, dtype=torch.float32)
    data = load_eval_tokens(args.data, tokenizer, "val", "auto")
    seq_len = args.seq_len or min(model.cfg.max_seq_len, data.length - 1)
    rows = []
    with torch.inference_mode():
        base = evaluate(model, tokenizer, data, seq_len)["loss"]
        rows.append({"variant": "float32", "loss": round(base, 5), "change_pct": 0.0})
        for name, bits, group, head, embedding in VARIANTS:
            if model.cfg.tie_embeddings and head != embedding:
                continue
            q = copy.deepcopy(model)
            quantize_model(q, bits, group, head=head, embedding=embedding)
            loss = evaluate(q, tokenizer, data, seq_len)["loss"]
            rows.append({"variant": name, "loss": round(loss, 5), "change_pct": round(100 * (loss / base - 1), 3)})
    report = {"date": time.strftime("%Y-%m-%d"), "ckpt": str(args.ckpt), "tokens": data.length, "seq_len": seq_len,
              "rows": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            print(f"{r['variant']:>28}: loss {r['loss']:.4f}  ({r['change_pct']:+.2f}%)")
    return report


if __name__ == "__main__":
    main()
