"""CPU decode, andromeda vs llama.cpp (llama-cpp-python), the same weights in the same run.

Builds a Llama-shaped andromeda model (default 6 layers x 384, 6 heads, SwiGLU 1024, a 320-id
byte vocabulary, random weights), exports it with `export_gguf` (the code behind
`andromeda convert --to-gguf`), and times greedy decoding at batch 1: a `--prompt-len` prompt
then `--new-tokens` tokens, prefill included, with `--threads` threads on both sides. Each
side runs `--repeats` times, alternating, and the median is reported, with the weight bytes
each new token reads and the memory bandwidth that implies (decode at batch 1 reads every
weight once per token, so bytes/s against the machine's bandwidth says where the time goes).

Rows: llama.cpp f32 against andromeda float32 with the compiled decode step; llama.cpp q8_0
against andromeda int8 and q4_0 against int4 when `andromeda.quant` offers weight-only
quantisation (`--precisions f32,q8_0,q4_0`); a precision whose andromeda side is missing is
reported as pending, not skipped silently.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py [--threads 1] [--new-tokens 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from andromeda.data.tokenizer import ByteTokenizer
from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.interop.gguf import export_gguf
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer

GGUF_FOR = {"f32": "f32", "int8": "q8_0", "int4": "q4_0"}


def build_model(vocab: int, dim: int, depth: int, heads: int, hidden: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=512, dim=dim, depth=depth, tie_embeddings=False,
                      attention=dict(heads=heads), position=dict(kind="rope"),
                      norm=dict(kind="rms", placement="pre", eps=1e-5), mlp=dict(kind="swiglu", hidden_dim=hidden))
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random norm gains, so that every weight matters in the agreement check
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def quantized(model: Transformer, bits: int):
    """andromeda's weight-only quantised copy of `model` (int8 per channel, int4 in groups of 32
    weights like q4_0's blocks), or None while andromeda.quant has no quantize_model."""
    try:
        from andromeda.quant.quantize import quantize_model  # the `andromeda quantize` API
    except ImportError:
        return None
    import copy
    copied = copy.deepcopy(model)
    quantize_model(copied, bits=bits, group_size=32 if bits == 4 else None)
    return copied


def time_llamacpp(llm, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    out = []
    start = time.perf_counter()
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(t)
        if len(out) == new_tokens:
            break
    return time.perf_counter() - start, out


def time_andromeda(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    start = time.perf_counter()
    result = engine.generate([prompt], params)[0]
    return time.perf_counter() - start, result.token_ids


def weight_bytes(path: Path) -> int:
    """Bytes of the weights a decode step reads (all but the token embedding, of which it reads one row)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="threads for both runtimes")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024, help="SwiGLU hidden width")
    ap.add_argument("--precisions", default="f32,int8,int4", help="andromeda side: f32, int8, int4")
    ap.add_argument("--eager", action="store_true", help="andromeda without its compiled decode step (smoke test)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from llama_cpp import Llama

    torch.set_num_threads(args.threads)
    model = build_model(args.vocab, args.dim, args.depth, args.heads, args.hidden, seed=0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (args.prompt_len,), generator=g).tolist()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
              "threads": args.threads, "torch": torch.__version__,
              "llama_cpp_python": __import__("llama_cpp").__version__,
              "shape": f"{args.depth}x{args.dim}, {args.heads} heads, SwiGLU {args.hidden}, vocab {args.vocab}",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1,
              "andromeda_decode": "eager" if args.eager else "compiled", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for ours_kind in args.precisions.split(","):
            theirs_kind = GGUF_FOR[ours_kind]
            row = {"llama.cpp": theirs_kind, "andromeda": ours_kind}
            ours = model if ours_kind == "f32" else quantized(model, 8 if ours_kind == "int8" else 4)
            if ours is None:
                row["status"] = "pending: andromeda.quant has no quantize_model yet"
                report["rows"].append(row)
                continue
            path = Path(tmp) / f"model-{theirs_kind}.gguf"
            export_gguf(model, ByteTokenizer(), path, theirs_kind)
            llm = Llama(str(path), n_ctx=512, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                        verbose=False)
            engine = Engine(ours, tokenizer=None, compile=not args.eager)
            try:
                _, theirs_tokens = time_llamacpp(llm, prompt, args.new_tokens)  # warm-up; compiles ours
                _, our_tokens = time_andromeda(engine, prompt, args.new_tokens)
                their_times, our_times = [], []
                for _ in range(args.repeats):
                    their_times.append(time_llamacpp(llm, prompt, args.new_tokens)[0])
                    our_times.append(time_andromeda(engine, prompt, args.new_tokens)[0])
            finally:
                llm.close()
            theirs_tps = args.new_tokens / statistics.median(their_times)
            ours_tps = args.new_tokens / statistics.median(our_times)
            gguf_bytes = weight_bytes(path)
            n = max(len(theirs_tokens), len(our_tokens))  # a missing token counts as a difference
            agree = next((i for i in range(n) if i >= min(len(theirs_tokens), len(our_tokens))
                          or theirs_tokens[i] != our_tokens[i]), n)
            row.update({"greedy_tokens_agreeing": agree,
                        "llamacpp_tokens_per_s": round(theirs_tps, 1), "andromeda_tokens_per_s": round(ours_tps, 1),
                        "ratio_andromeda_over_llamacpp": round(ours_tps / theirs_tps, 2),
                        "weight_mb_per_token": round(gguf_bytes / 1e6, 1),
                        "llamacpp_gb_per_s": round(gguf_bytes * theirs_tps / 1e9, 1)})
            if ours_kind == "f32":
                row["andromeda_gb_per_s"] = round(gguf_bytes * ours_tps / 1e9, 1)
            report["rows"].append(row)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k != "rows":
                print(f"{k:>18}: {v}")
        for row in report["rows"]:
            print("  " + json.dumps(row))
    return report


if __name__ == "__main__":
    main()
