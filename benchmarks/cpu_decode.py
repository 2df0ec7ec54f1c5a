"""CPU decode, andromeda vs Hugging Face transformers, same weights, same run.

Builds a LlamaForCausalLM (6 layers, dim 384, 6 heads, SwiGLU 1024, byte-sized vocabulary,
random weights, float32), copies its weights into an andromeda model, checks that greedy
outputs agree, then times greedy decoding of `--new-tokens` tokens after a `--prompt-len`
prompt (batch 1): HF `generate` with its default dynamic cache against andromeda's `Engine`.
Each side runs `--repeats` times, alternating, and the median is reported.

    .venv/bin/python benchmarks/cpu_decode.py [--threads 2] [--new-tokens 256] [--json]
    .venv/bin/python benchmarks/cpu_decode.py --dim 768 --depth 12 --heads 12 --hidden 2048   (beyond L3)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.interop.hf import model_from_hf_state
from andromeda.model.transformer import Transformer


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
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
