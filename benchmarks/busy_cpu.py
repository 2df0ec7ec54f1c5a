"""Decoding and training speed when other processes share the CPU cores.

For each load (0, 1, ... extra processes, each spinning on one core) and each setting, a
fresh child process (OpenMP reads its wait policy once, at start-up) times greedy eager
decoding of a 6x384 Llama-shaped model (batch 1, 32-token prompt, `--new-tokens` tokens)
and a few training steps of llama-tiny (batch 8 x 128 tokens). Settings (SETTINGS below):
PyTorch's default (a thread per core, OpenMP's spinning wait), one thread, a thread per core
with OMP_WAIT_POLICY=PASSIVE, a thread per core with a short spin (GOMP_SPINCOUNT=10000), and
the CLI's default (andromeda.threads.choose_wait_policy: on an idle machine a thread per core
with the short spin, on a busy one the free cores with passive wait). Settings run
interleaved, `--rounds` times each, so that a change in the machine's other load hits all.

    .venv/bin/python benchmarks/busy_cpu.py [--loads 0,1,2] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(threads: str, new_tokens: int, repeats: int) -> dict:
    from andromeda.threads import apply_threads, choose_wait_policy

    if threads == "auto":
        choose_wait_policy()  # as the CLI does, before torch loads
    chosen = apply_threads(None if threads == "auto" else int(threads))
    import torch

    from andromeda.infer.engine import Engine
    from andromeda.infer.sampling import SamplingParams
    from andromeda.model.config import ModelConfig
    from andromeda.model.transformer import Transformer
    from andromeda.train.benchmark import benchmark_train

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, max_seq_len=512, dim=384, depth=6, attention=dict(heads=6, kv_heads=6),
                      mlp=dict(kind="swiglu", hidden_dim=1024))
    engine = Engine(Transformer(cfg).eval())
    prompt = list(range(32))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        r = engine.generate([prompt], params)[0]
        rates.append(r.new_tokens / (time.perf_counter() - start))
    train = benchmark_train("llama-tiny", seq_len=128, batch_size=8, steps=5, warmup=2)
    return {"threads": chosen, "decode_tok_s": statistics.median(rates), "train_tok_s": train["tokens_per_s"]}


def spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


# (label, --threads value for the child, OMP_WAIT_POLICY or None for OpenMP's default)
SETTINGS = {
    "torch-default": ("all", None),      # PyTorch as it comes: a spinning thread per core
    "one-thread": ("1", None),
    "all-passive": ("all", "PASSIVE"),
    "spin-10k": ("all", "GOMP_SPINCOUNT=10000"),  # a thread per core, a short spin before sleeping
    "cli-default": ("auto", None),  # what andromeda's commands do unless told otherwise
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="0,1,2", help="busy processes to run beside the measurement")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"among {', '.join(SETTINGS)}")
    p.add_argument("--rounds", type=int, default=2, help="times each setting runs, interleaved")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", metavar="THREADS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.new_tokens, args.repeats)))
        return
    cores = len(os.sched_getaffinity(0))
    rows = []
    for load in [int(x) for x in args.loads.split(",")]:
        spinners = [spinner() for _ in range(load)]
        try:
            time.sleep(2 if load else 0)
            for _ in range(args.rounds):
                for label in args.settings.split(","):
                    threads, policy = SETTINGS[label]
                    env = dict(os.environ)
                    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
                        env.pop(var, None)
                    if policy is not None:
                        var, _, value = policy.rpartition("=")
                        env[var or "OMP_WAIT_POLICY"] = value
                    threads = str(cores) if threads == "all" else threads
                    before = os.getloadavg()[0]
                    out = subprocess.run([sys.executable, __file__, "--child", threads, "--new-tokens",
                                          str(args.new_tokens), "--repeats", str(args.repeats)],
                                         env=env, capture_output=True, text=True, timeout=600, check=True)
                    row = {"load": load, "setting": label, "loadavg_before": round(before, 2),
                           **json.loads(out.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    if not args.json:
                        print(f"load {load}  {label:<14} threads {row['threads']}  "
                              f"decode {row['decode_tok_s']:7.1f} tok/s  train {row['train_tok_s']:7.0f} tok/s  "
                              f"(load average before {before:.2f})", flush=True)
        finally:
            for s in spinners:
                s.kill()
                s.wait(timeout=30)
    if args.json:
        print(json.dumps({"cpus": cores, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
