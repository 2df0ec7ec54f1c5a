"""Held-out loss of a checkpoint in float32 and under each weight-only quantisation scheme.

Loads the float checkpoint once, quantises copies in memory (andromeda.quant.quantize_model)
and evaluates each on the same held-out tokens: int8, int4 at every group size, and the
choices for the head and the embedding (int4 head, float head, float embedding), so that the
defaults of `andromeda quantize` rest on measurements. Prints one row per variant with its
loss and its change against float32.

Two losses per variant: over all held-out tokens in full windows (the path of `eval` and
prefill: exact products over the dequantised weights), and with --decode-tokens N (default
2048) over the first N of them fed one token at a time through the KV cache (the path of
`generate`, `chat` and `serve`, where the CPU kernels quantise or round the activations).

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
from andromeda.infer.generate import decode_one_token
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


def decode_loss(model, ids: torch.Tensor, window: int) -> float:
    """Mean next-token loss of ids (1-D) scored one token at a time through a KV cache, in
    windows of `window` tokens (each window starts an empty cache)."""
    total, count = 0.0, 0
    for lo in range(0, len(ids) - 1, window):
        chunk = ids[lo:lo + window + 1]
        cache = model.new_cache(batch=1, max_len=window + 1)
        for t in range(len(chunk) - 1):
            logits = decode_one_token(model, cache, chunk[t].view(1, 1), t).float()
            total += torch.nn.functional.cross_entropy(logits, chunk[t + 1].view(1)).item()
            count += 1
    return total / count


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="prepared data folder (its val split) or a text file")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=2048,
                    help="held-out tokens also scored one at a time through the cache (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_checkpoint(args.ckpt, dtype=torch.float32)
    data = load_eval_tokens(args.data, tokenizer, "val", "auto")
    seq_len = args.seq_len or min(model.cfg.max_seq_len, data.length - 1)
    rows = []
    decode_ids = (torch.as_tensor(data.tokens.read(0, min(args.decode_tokens + 1, data.length)).astype("int64"))
                  if args.decode_tokens else None)

    def score(m) -> dict:
        row = {"loss": evaluate(m, tokenizer, data, seq_len)["loss"]}
        if decode_ids is not None:
            row["decode_loss"] = decode_loss(m, decode_ids, seq_len)
        return row

    with torch.inference_mode():
        base = score(model)
        variants = [("float32", model)]
        for name, bits, group, head, embedding in VARIANTS:
            if model.cfg.tie_embeddings and head != embedding:
                continue
            q = copy.deepcopy(model)
            quantize_model(q, bits, group, head=head, embedding=embedding)
            variants.append((name, q))
        for name, m in variants:
            got = base if m is model else score(m)
            row = {"variant": name}
            for key, value in got.items():
                row[key] = round(value, 5)
                row[key.replace("loss", "change_pct")] = round(100 * (value / base[key] - 1), 3)
            rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d"), "ckpt": str(args.ckpt), "tokens": data.length, "seq_len": seq_len,
              "decode_tokens": args.decode_tokens, "rows": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            decode = (f"; one token at a time {r['decode_loss']:.4f} ({r['decode_change_pct']:+.2f}%)"
                      if "decode_loss" in r else "")
            print(f"{r['variant']:>28}: loss {r['loss']:.4f} ({r['change_pct']:+.2f}%){decode}")
    return report


if __name__ == "__main__":
    main()
