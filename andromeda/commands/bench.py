"""Benchmarks on randomly initialised presets.

  bench prefill --preset NAME --seq 2048,8192 [--batch 1]
      time to the last-token logits of a prompt (median of --repeats after --warmup runs,
      with device synchronisation), tokens/s and peak memory. On CPU the peak is the process's
      high-water mark (ru_maxrss), so lengths run shortest first and each row also reports the
      growth over the resident size before any prefill (`prefill_mb`: activations, not weights).
  bench decode --preset NAME [--prompt-len 16 --new-tokens 256 --batch 1,8] [--compile]
      greedy decoding through the generation engine: tokens/s per sequence and in total; on
      CUDA also the fraction of HBM bandwidth used, (weight bytes + KV bytes read per step) /
      step time / peak bandwidth (peak from a table of known GPUs, or --hbm-gbps).
  bench train --preset NAME [--seq 1024 --batch 8 --steps 10] [--compile]
      the trainer's benchmark (andromeda.train.benchmark.benchmark_train): tokens/s and MFU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from andromeda.devices import resolve_device, resolve_dtype
from andromeda.errors import UserError
from andromeda.infer.engine import prepare_model, synchronize

# Peak memory bandwidth in GB/s of GPUs we benchmark on (vendor data sheets).
HBM_GBPS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
            "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "A100-PCIE-40GB": 1555,
            "L4": 300, "A10G": 600, "RTX 4090": 1008}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _common(p) -> None:
    p.add_argument("--preset", default="llama", help="model preset (random weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="bench", metavar="KIND")
    pre = sub.add_parser("prefill", help="time to last-token logits")
    _common(pre)
    pre.add_argument("--seq", type=_ints, default=[2048], help="prompt lengths, comma-separated")
    pre.add_argument("--batch", type=int, default=1)
    dec = sub.add_parser("decode", help="decoding tokens/s")
    _common(dec)
    dec.add_argument("--prompt-len", type=int, default=16)
    dec.add_argument("--new-tokens", type=int, default=256)
    dec.add_argument("--batch", type=_ints, default=[1], help="batch sizes, comma-separated")
    dec.add_argument("--compile", action="store_true")
    dec.add_argument("--hbm-gbps", type=float, default=None, help="peak memory bandwidth, if not in the table")
    tr = sub.add_parser("train", help="training throughput (the trainer's benchmark)")
    tr.add_argument("--preset", default="gpt2")
    tr.add_argument("--seq", type=int, default=1024, help="sequence length")
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--steps", type=int, default=10, help="timed steps")
    tr.add_argument("--warmup", type=int, default=3)
    tr.add_argument("--compile", action="store_true")
    tr.add_argument("--device", default=None)
    tr.add_argument("--dtype", default="auto")
    tr.add_argument("--json", action="store_true")


def _model(preset: str, device, dtype, min_context: int = 0):
    from andromeda.model.transformer import build_model
    from andromeda.presets import get_preset

    cfg = get_preset(preset)
    # A benchmark may need a longer context than the preset's; the weights are random anyway.
    cfg.max_seq_len = max(cfg.max_seq_len, min_context)
    torch.manual_seed(0)
    return prepare_model(build_model(cfg, device=device), device, dtype)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms over `repeats` calls after `warmup` untimed ones,
    synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:  # pages: size resident shared ...
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def bench_prefill(args, device, dtype) -> list[dict]:
    model = _model(args.preset, device, dtype, max(args.seq))
    rows = []
    cpu = device.type == "cpu"
    base_mb = _resident_mb() if cpu else 0.0
    for seq in sorted(args.seq) if cpu else args.seq:
        tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, seq), device=device)
        _reset_peak(device)

        def run():
            with torch.inference_mode():
                model(tokens, last_only=True)

        try:
            ms = median_ms(run, device, args.warmup, args.repeats)
        except torch.OutOfMemoryError:
            rows.append({"seq": seq, "batch": args.batch, "error": "out of memory"})
            _reset_peak(device)
            continue
        rows.append({"seq": seq, "batch": args.batch, "median_ms": round(ms, 3),
                     "tokens_per_s": round(args.batch * seq / ms * 1000, 1),
                     "peak_memory_mb": round(_peak_memory_mb(device), 1)})
        if cpu:
            rows[-1]["prefill_mb"] = round(_peak_memory_mb(device) - base_mb, 1)
    return rows


def _hbm_peak(device, override) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in HBM_GBPS.items():
        if key in name:
            return gbps
    return None


def bench_decode(args, device, dtype) -> list[dict]:
    from andromeda.infer.engine import Engine
    from andromeda.infer.sampling import SamplingParams

    if args.prompt_len < 1 or args.new_tokens < 2:
        raise UserError("--prompt-len must be >= 1 and --new-tokens >= 2")
    model = _model(args.preset, device, dtype, args.prompt_len + args.new_tokens)
    engine = Engine(model, None, device=device, dtype=dtype, compile=args.compile)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.cfg
    kv_per_token = 2 * cfg.depth * cfg.attention.kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    peak = _hbm_peak(device, args.hbm_gbps)
    rows = []
    for batch in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        for _ in range(max(args.warmup, 1 if args.compile else 0)):
            engine.generate(prompts, params)
        rates = []
        for _ in range(args.repeats):
            results = engine.generate(prompts, params)
            rates.append(statistics.mean(r.decode_tokens_per_s for r in results))
        per_seq = statistics.median(rates)
        row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "tokens_per_s_per_sequence": round(per_seq, 1), "tokens_per_s_total": round(per_seq * batch, 1),
               "compile": args.compile}
        if peak is not None:
            # Each step reads every weight once and the KV cache of every sequence: the whole
            # static buffer when compiled (tensor positions), the filled prefix otherwise.
            cache_len = engine.cache_for(model, batch, args.prompt_len + args.new_tokens)[0].max_len
            mean_len = cache_len if args.compile else args.prompt_len + args.new_tokens / 2
            step_bytes = weight_bytes + batch * mean_len * kv_per_token
            row["hbm_fraction"] = round(step_bytes * per_seq / (peak * 1e9), 4)
            row["hbm_peak_gbps"] = peak
        rows.append(row)
    return rows


def bench_train(args) -> int:
    from andromeda.train.benchmark import benchmark_train

    if min(args.seq, args.batch, args.steps) < 1 or args.warmup < 0:
        raise UserError("--seq, --batch and --steps must be >= 1 and --warmup >= 0")
    result = benchmark_train(args.preset, seq_len=args.seq, batch_size=args.batch, steps=args.steps,
                             compile=args.compile, dtype=args.dtype, device=args.device, warmup=args.warmup)
    if args.json:
        print(json.dumps({"bench": "train", "preset": args.preset, **result}))
    else:
        print(f"train {args.preset}: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def run(args) -> int:
    if args.bench is None:
        raise UserError("choose a benchmark: prefill, decode or train")
    if args.bench == "train":
        return bench_train(args)
    if args.repeats < 1 or args.warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rows = bench_prefill(args, device, dtype) if args.bench == "prefill" else bench_decode(args, device, dtype)
    header = {"bench": args.bench, "preset": args.preset, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "results": rows}
    if args.json:
        print(json.dumps(header))
        return 0
    print(f"{args.bench} {args.preset} on {header['device_name']} ({header['dtype']})")
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    sys.stdout.flush()
    return 0
