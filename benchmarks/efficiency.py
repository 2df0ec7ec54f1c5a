"""What the efficient architectures cost and save at run time, measured on one device.

    python benchmarks/efficiency.py [--device cuda] [--dim 512 --depth 8] [--json OUT.json]

Three measurements, each against its dense reference in the same run:

1. Models at matched active parameters (the arch_compare.py rule: dense, moe, jamba,
   bitnet, anemone-bf16, anemone; one FFN width per model is searched so that active
   parameters match the dense model's): training tokens/s (forward, backward and AdamW
   step on random tokens, `andromeda.train.benchmark.benchmark_train`), the bytes held by
   weights and optimizer state, peak GPU memory (CUDA only), eval forward tokens/s and
   batch-1 greedy decode tokens/s (`Engine`, eager; with --compile also compiled).
2. The BitNet model packed at 2 bits per ternary weight against its unpacked twin in the
   inference dtype (bf16 on GPU, float32 on CPU): resident weight bytes and decode tokens/s.
3. One MoE FFN (E experts, top-k, expert width h) against a dense SwiGLU FFN of width k * h
   (the same multiply-adds per token): forward + backward tokens/s over N tokens.

Every figure is the median of `--repeats` timings after warm-up. Results print as a table
and, with --json, are written to a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch_compare import model_configs  # noqa: E402  (the same matching rule as the loss comparison)

from andromeda.commands.bench import median_ms  # noqa: E402
from andromeda.infer.engine import Engine  # noqa: E402
from andromeda.infer.sampling import SamplingParams  # noqa: E402
from andromeda.model import ModelConfig, build_model, count_parameters  # noqa: E402
from andromeda.train.benchmark import benchmark_train  # noqa: E402

PROMPT = 16  # decode prompt length
MODELS = ["dense", "moe", "jamba", "bitnet", "anemone-bf16", "anemone"]


def decode_tokens_per_s(model, device, dtype, new_tokens: int, repeats: int, compile: bool = False) -> float:
    engine = Engine(model, None, device=device, dtype=dtype, compile=compile)
    prompt = torch.randint(0, model.cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    engine.generate([prompt], params)  # warm-up
    return statistics.median(engine.generate([prompt], params)[0].decode_tokens_per_s for _ in range(repeats))


def decode_columns(model, args, device, dtype) -> dict:
    """Batch-1 decode tokens/s, eager, and compiled with --compile."""
    out = {"decode_tokens_per_s": round(decode_tokens_per_s(model, device, dtype, args.new_tokens, args.repeats), 1)}
    if args.compile:
        out["decode_compiled_tokens_per_s"] = round(decode_tokens_per_s(
            model, device, dtype, args.new_tokens, args.repeats, compile=True), 1)
    return out


def resident_bytes(model) -> int:
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def matched_models(args, device, train_dtype: str, infer_dtype: torch.dtype) -> list[dict]:
    configs = model_configs(args.models, args.vocab, args.seq_len, args.dim, args.depth)
    rows = []
    for name, d in configs.items():
        cfg = ModelConfig.from_dict(d)
        total, active = count_parameters(build_model(cfg, device="meta"))
        train = benchmark_train(cfg, args.seq_len, args.batch_size, args.repeats, dtype=train_dtype,
                                device=str(device), warmup=2)
        torch.manual_seed(0)
        model = build_model(cfg, device=device, dtype=infer_dtype).eval()
        tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)

        def forward():
            with torch.inference_mode():
                model(tokens)
        eval_ms = median_ms(forward, device, 2, args.repeats)
        rows.append({"model": name, "total_params": total, "active_params": active,
               "train_tokens_per_s": round(train["tokens_per_s"], 1),
               "weights_and_optimizer_mb": round(train["weights_and_optimizer_bytes"] / 2**20, 2),
               "train_peak_mem_mb": round(train["peak_mem"] / 2**20, 1) if train["peak_mem"] else None,
               "eval_tokens_per_s": round(tokens.numel() / eval_ms * 1000, 1),
               **decode_columns(model, args, device, infer_dtype)})
        print(f"  {name}: done", file=sys.stderr)
    return rows


def packed_bitnet(args, device, infer_dtype: torch.dtype) -> list[dict]:
    from andromeda.quant.bitpack import pack_model, ternary_bytes

    d = model_configs(["bitnet"], args.vocab, args.seq_len, args.dim, args.depth)["bitnet"]
    torch.manual_seed(0)
    twin = build_model(ModelConfig.from_dict(d), device=device, dtype=infer_dtype).eval()
    packed = build_model(ModelConfig.from_dict(d), device=device, dtype=infer_dtype).eval()
    packed.load_state_dict(twin.state_dict())
    ternary_dense, _ = ternary_bytes(packed)
    pack_model(packed)
    _, ternary_packed = ternary_bytes(packed)
    x = torch.randint(0, twin.cfg.vocab_size, (1, 32), device=device)
    with torch.inference_mode():
        same = (twin(x) - packed(x)).abs().max().item()
    rows = []
    for label, model in (("unpacked " + str(infer_dtype).replace("torch.", ""), twin), ("packed 2-bit", packed)):
        rows.append({"form": label, "resident_weight_mb": round(resident_bytes(model) / 2**20, 2),
                     **decode_columns(model, args, device, infer_dtype)})
    rows[0]["ternary_weights_mb_bf16"] = round(ternary_dense / 2**20, 2)
    rows[1]["ternary_weights_mb"] = round(ternary_packed / 2**20, 2)
    rows[1]["max_logit_diff_vs_unpacked"] = same
    return rows


def moe_dispatch(args, device, dtype: torch.dtype) -> list[dict]:
    from andromeda.model.plan import FFNS
    from andromeda.model.state import Context, Positions

    base = dict(vocab_size=256, max_seq_len=64, dim=args.dim, depth=1, attention=dict(heads=4, kv_heads=2),
                position=dict(kind="rope"), norm=dict(kind="rms"))
    moe = dict(num_experts=args.experts, top_k=args.top_k, hidden_dim=args.expert_hidden)
    dense = dict(kind="swiglu", hidden_dim=args.top_k * args.expert_hidden)
    layers = {"dense SwiGLU, width k*h": {**base, "mlp": dense},
              f"MoE {args.experts} experts, top-{args.top_k}, width h": {**base, "layout": {"ffn": "moe"}, "moe": moe}}
    x = torch.randn(args.moe_tokens // 256, 256, args.dim, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for label, d in layers.items():
        torch.manual_seed(0)
        cfg = ModelConfig.from_dict(d)
        layer = FFNS[cfg.plan[0].ffn].load()(cfg, 0).to(device, dtype).train()

        def step():
            y, aux = layer(x, Context(Positions.make(0, 256, device)))
            loss = y.float().square().mean()
            (loss + (sum(aux.losses.values()) if aux is not None else 0.0)).backward()
        ms = median_ms(step, device, 2, args.repeats)
        rows.append({"layer": label, "tokens": x.shape[0] * x.shape[1],
                     "fwd_bwd_tokens_per_s": round(x.shape[0] * x.shape[1] / ms * 1000, 1),
                     "params": sum(p.numel() for p in layer.parameters())})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--moe-tokens", type=int, default=8192)
    p.add_argument("--compile", action="store_true", help="also time compiled decoding (compiles every model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise SystemExit(f"error: unknown model {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    if args.depth < 4:
        raise SystemExit("error: --depth must be >= 4 so that the Jamba layout has attention, Mamba, MoE and MoD")
    if min(args.dim, args.seq_len, args.batch_size, args.new_tokens, args.repeats, args.moe_tokens) < 1:
        raise SystemExit("error: sizes and --repeats must be >= 1")
    if args.seq_len < PROMPT + args.new_tokens:
        raise SystemExit(f"error: --seq-len (the models' context) must be >= {PROMPT} + --new-tokens "
                         f"(decoding starts from a {PROMPT}-token prompt)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    train_dtype, infer_dtype = ("bf16", torch.bfloat16) if cuda else ("fp32", torch.float32)
    machine = (torch.cuda.get_device_name(device) if cuda
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    results = {"date": time.strftime("%Y-%m-%d"), "device": machine, "torch": torch.__version__,
               "shape": {k: getattr(args, k) for k in ("dim", "depth", "vocab", "seq_len", "batch_size")},
               "matched_models": matched_models(args, device, train_dtype, infer_dtype),
               "bitnet_packed": packed_bitnet(args, device, infer_dtype),
               "moe_dispatch": moe_dispatch(args, device, infer_dtype)}
    print(f"{results['date']}, {machine}, torch {torch.__version__}, shape {results['shape']}")
    for key in ("matched_models", "bitnet_packed", "moe_dispatch"):
        print(f"\n{key}\n{table(results[key])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
