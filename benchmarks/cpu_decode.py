"""CPU decode, andromeda vs Hugging Face transformers, same weights, same run.

Builds a LlamaForCausalLM (6 layers, dim 384, 6 heads, SwiGLU 1024, byte-sized vocabulary,
random weights, float32), copies its weights into an andromeda model, checks that greedy
outputs agree, then times greedy decoding of `--new-tokens` tokens after a `--prompt-len`
prompt (batch 1): HF `generate` with its default dynamic cache against andromeda's `Engine`.
Each side runs `--repeats` times, alternating, and the median is reported.

    .venv/bin/python benchmarks/cpu_decode.py [--threads 2] [--new-tokens 256] [--json]
    .venv/bin/python benchmarks/cpu_decode.py --dim 768 --depth 12 --heads 12 --hidden 2048   (beyond L3)

With --quant, the peer is andromeda's own float32 compiled decoding instead of transformers: the
same weights quantised in memory to int8 (per channel) and int4 (groups of --group-size), each
decoded compiled, timed alternating with the float32 model; it reports tokens/s, the speedup
over float32, and how many greedy tokens agree with float32's.

    .venv/bin/python benchmarks/cpu_decode.py --quant [--dim 768 --depth 12 --heads 12 --hidden 2048]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.interop.hf import model_from_hf_state
from andromeda.model.transformer import Transformer
from andromeda.quant.quantize import quantize_model


def hf_llama(vocab: int, dim: int, depth: int, heads: int, hidden: int, ctx: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=depth,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=ctx,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    # Random norm gains so that every weight matters in the agreement check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def andromeda_from_llama(hf) -> Transformer:
    """The same weights through the Hugging Face importer (andromeda.interop.hf)."""
    return model_from_hf_state(hf.config.to_dict(), hf.state_dict(), torch.float32, source="benchmark model").eval()


def time_hf(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        elapsed = time.perf_counter() - start
    return elapsed, out[0, prompt.shape[1]:].tolist()


def time_andromeda(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    start = time.perf_counter()
    result = engine.generate([prompt], params)[0]
    elapsed = time.perf_counter() - start
    return elapsed, result.token_ids


def greedy_agreement(reference: list[int], ours: list[int]) -> int:
    """Length of the common prefix, counting a missing token as a difference (a shorter
    continuation does not agree with a longer one past its end)."""
    n = max(len(reference), len(ours))
    return next((i for i in range(n) if i >= min(len(reference), len(ours)) or reference[i] != ours[i]), n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads for both libraries (on a shared 2-core machine, 2 threads collapse under load)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--compile", action="store_true", help="compile andromeda's decode step (inductor C++)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024, help="SwiGLU hidden width")
    ap.add_argument("--quant", action="store_true",
                    help="time int8 and int4 weight-only decoding against float32 compiled (no transformers run)")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size with --quant")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quant:
        return quant_main(args)

    hf = hf_llama(args.vocab, args.dim, args.depth, args.heads, args.hidden, 512, seed=0)
    ours = andromeda_from_llama(hf)
    engine = Engine(ours, tokenizer=None, compile=args.compile)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=g)

    # Agreement: same logits on a full forward, and the same greedy continuation.
    with torch.inference_mode():
        diff = (hf(prompt).logits - ours(prompt)).abs().max().item()
    _, hf_tokens = time_hf(hf, prompt, args.new_tokens)
    _, our_tokens = time_andromeda(engine, prompt[0].tolist(), args.new_tokens)
    agree = greedy_agreement(hf_tokens, our_tokens)

    hf_times, our_times = [], []
    for _ in range(args.repeats):
        hf_times.append(time_hf(hf, prompt, args.new_tokens)[0])
        our_times.append(time_andromeda(engine, prompt[0].tolist(), args.new_tokens)[0])
    hf_tps = args.new_tokens / statistics.median(hf_times)
    our_tps = args.new_tokens / statistics.median(our_times)
    import transformers
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__,
              "transformers": transformers.__version__,
              "shape": f"{args.depth}x{args.dim}, {args.heads} heads, SwiGLU {args.hidden}",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1,
              "max_logit_diff": diff, "greedy_tokens_agreeing": agree,
              "hf_tokens_per_s": round(hf_tps, 1), "andromeda_tokens_per_s": round(our_tps, 1),
              "speedup": round(our_tps / hf_tps, 2), "compile": args.compile}
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>24}: {v}")
    return report


def quant_main(args) -> dict:
    """float32 / int8 / int4 compiled decoding of the same weights, alternating."""
    hf = hf_llama(args.vocab, args.dim, args.depth, args.heads, args.hidden, 512, seed=0)
    float_model = andromeda_from_llama(hf)
    del hf
    models = {"float32": float_model}
    for bits, name in ((8, "int8"), (4, "int4")):
        models[name] = copy.deepcopy(float_model)
        quantize_model(models[name], bits, args.group_size)
    engines = {name: Engine(m, tokenizer=None, compile=True) for name, m in models.items()}
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist()
    tokens = {name: time_andromeda(e, prompt, args.new_tokens)[1] for name, e in engines.items()}  # compiles
    times: dict = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, e in engines.items():
            times[name].append(time_andromeda(e, prompt, args.new_tokens)[0])
    tps = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": _cpu_model(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "shape": f"{args.depth}x{args.dim}, {args.heads} heads, SwiGLU {args.hidden}",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1, "group_size": args.group_size,
              "repeats": args.repeats}
    for name in engines:
        agree = greedy_agreement(tokens["float32"], tokens[name])
        report[f"{name}_tokens_per_s"] = round(tps[name], 1)
        report[f"{name}_speedup"] = round(tps[name] / tps["float32"], 2)
        report[f"{name}_greedy_tokens_agreeing"] = agree
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>32}: {v}")
    return report


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
