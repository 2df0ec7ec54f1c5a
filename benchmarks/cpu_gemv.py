"""One-row products on CPU: how fast each way of computing `x @ W.T` streams the weights.

Uses the 25 weight shapes of the benchmark model of benchmarks/cpu_decode.py (6 layers of
fused q/k/v 1152x384, output 384x384, fused gate/up 2048x384, down 384x1024, and the 320x384
head; 43 MB in float32, more than the L3) and times, per token, all 25 products:

- `F.linear` over the (out, in) layout, over input-major weights, and over the mix the eager
  engine uses (widening weights input-major);
- the same products as `(x[..., None, :] * W).sum(-1)` compiled together by Inductor, over
  each layout (what compiled decoding does, over (out, in));
- a plain `W.sum()` of every weight: the machine's streaming rate, the floor.

    .venv/bin/python benchmarks/cpu_gemv.py [--threads 1] [--iters 200] [--rows 1]

With --rows N the products take N rows at once (decoding a batch of N).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(1152, 384), (384, 384), (2048, 384), (384, 1024)] * 6 + [(320, 384)]


def per_call_ms(fn, iters: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rows", type=int, default=1, help="rows per product (the decoding batch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_in = [torch.randn(o, i) for o, i in SHAPES]
    input_major = [w.t().contiguous().t() for w in out_in]
    mixed = [t if w.shape[0] > w.shape[1] else w for w, t in zip(out_in, input_major)]
    if args.rows < 1 or args.iters < 1:
        raise SystemExit("error: --rows and --iters must be >= 1")
    rows = {i: torch.randn(args.rows, i) for i in {s[1] for s in SHAPES}}
    megabytes = sum(w.numel() * 4 for w in out_in) / 1e6

    def linears(ws):
        return lambda: [F.linear(rows[w.shape[1]], w) for w in ws]

    def reductions(*ws):
        return [(rows[w.shape[1]][:, None, :] * w).sum(-1) for w in ws]
    compiled = torch.compile(reductions, dynamic=False)

    def compiled_linears(*ws):
        return [F.linear(rows[w.shape[1]], w) for w in ws]
    compiled_linear = torch.compile(compiled_linears, dynamic=False)

    results = {
        "F.linear, (out, in)": per_call_ms(linears(out_in), args.iters),
        "F.linear, input-major": per_call_ms(linears(input_major), args.iters),
        "F.linear, widening input-major (eager engine)": per_call_ms(linears(mixed), args.iters),
        "compiled mul-sum, (out, in) (compiled engine)": per_call_ms(lambda: compiled(*out_in), args.iters),
        "compiled mul-sum, input-major": per_call_ms(lambda: compiled(*input_major), args.iters),
        "compiled F.linear, (out, in)": per_call_ms(lambda: compiled_linear(*out_in), args.iters),
        "W.sum() (streaming floor)": per_call_ms(lambda: [w.sum() for w in out_in], args.iters),
    }
    print(f"{len(SHAPES)} products of {args.rows} row(s) over {megabytes:.1f} MB of float32 weights, "
          f"{args.threads} thread(s)")
    for name, ms in results.items():
        print(f"  {name:48s} {ms:6.2f} ms   {megabytes / ms:5.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
