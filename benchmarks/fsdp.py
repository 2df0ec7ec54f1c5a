"""Per-rank memory and step time of DDP, FSDP and FSDP + CPU offload at several world sizes.

Driver (launches torchrun once per setup and world size, prints a markdown table):

  python benchmarks/fsdp.py --preset gpt2 --seq 128 --batch 1 --steps 2 --worlds 1,2,4
  python benchmarks/fsdp.py --device cuda --worlds 1,2,4,8 --preset llama --seq 2048 --batch 4 --json
  python benchmarks/fsdp.py --device cuda --worlds 1,8 --probe gpt2,andromeda-1b,llama,andromeda-3b --steps 1

`--probe` tries the presets in the order given (smallest first) for each setup and world size
and reports the largest that trains (a worker that fails, e.g. out of memory, ends the probe).

Worker (one rank; what the driver runs under torchrun):

  torchrun --nproc_per_node 2 benchmarks/fsdp.py --worker --parallel fsdp --out rank_stats/

Each rank trains `--steps` timed optimizer steps (after one untimed warmup step) on random
tokens through the same Trainer as `andromeda train` and reports the bytes it holds for
parameters, gradients and optimizer state (its shards only), its peak resident memory (CPU)
or peak allocated memory (CUDA), and the median step time. Nothing is written but the stats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = {"ddp": [], "fsdp": ["--parallel", "fsdp"], "fsdp+offload": ["--parallel", "fsdp", "--offload", "cpu"]}


def worker(args) -> None:
    import torch

    from andromeda.model.transformer import build_model
    from andromeda.presets import get_preset
    from andromeda.train.benchmark import RandomTokens
    from andromeda.train.config import TrainConfig
    from andromeda.train.parallel import init_distributed, local_state_bytes, shutdown_distributed
    from andromeda.train.trainer import Trainer

    cfg = TrainConfig(max_steps=args.steps + 1, batch_size=args.batch, seq_len=args.seq, parallel=args.parallel,
                      offload=args.offload, device=args.device, tensorboard=False, warmup_frac=0.0,
                      grad_clip=1.0, dtype=args.dtype)
    device = torch.device(args.device)
    info = init_distributed(device.type, args.parallel)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model_cfg = get_preset(args.preset)
    if args.depth:
        import dataclasses
        model_cfg = dataclasses.replace(model_cfg, depth=args.depth)
    torch.manual_seed(0)
    if args.parallel == "fsdp":
        model = build_model(model_cfg, device="meta")
    else:
        model = build_model(model_cfg, device="meta").to_empty(device="cpu")
        if model_cfg.tie_embeddings:
            model.head.weight = model.embed.weight
        model.init_weights()
    data = RandomTokens(model_cfg.vocab_size, args.batch, args.seq, device, seed=info.rank)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(tmp), model, None, cfg, data, None, device, dist=info, progress=False)
        built = _peak(device)  # the model materialised (sharded), before any step
        trainer.train_step()  # warmup: allocator growth, optimizer state
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_step()  # ends in a host sync (the all-reduced finiteness check)
            times.append(time.perf_counter() - start)
        x, _, _ = data.next_batch()  # one more backward: the gradients as the optimizer sees them
        trainer.model(x).float().mean().backward()
        held = local_state_bytes(trainer.raw, trainer.optimizer)
    stats = dict(held, rank=info.rank, world=info.world, parallel=args.parallel, offload=args.offload,
                 peak_bytes=_peak(device), peak_after_build_bytes=built, step_s=statistics.median(times),
                 parameters=sum(
                     p.numel() for p in {id(p): p for p in trainer.raw.parameters()}.values()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{info.rank}.json").write_text(json.dumps(stats))
    shutdown_distributed(info)


def _peak(device) -> int:
    """Peak allocated CUDA memory, or on CPU the peak resident set of this process (which also
    counts the torch runtime, ~0.3 GB, and memory the allocator keeps after freeing it)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setup(setup: str, world: int, args, timeout: float) -> list[dict]:
    """torchrun `world` workers of one setup; their stats, rank order."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", __file__, "--worker",
               "--preset", args.preset, "--seq", str(args.seq), "--batch", str(args.batch), "--steps",
               str(args.steps), "--device", args.device, "--dtype", args.dtype, "--out", out, *SETUPS[setup]]
        if args.depth:
            cmd += ["--depth", str(args.depth)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // world)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{setup} x {world} failed:\n{proc.stderr[-3000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def probe(args) -> None:
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for setup in args.setups.split(","):
            largest, failed = None, None
            for preset in args.probe.split(","):
                try:
                    run_setup(setup, world, argparse.Namespace(**{**vars(args), "preset": preset}), args.timeout)
                    largest = preset
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    failed = f"{preset}: {str(e).strip().splitlines()[-1][:200]}"
                    break
            rows.append({"setup": setup, "world": world, "largest": largest, "first_failure": failed})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows) if args.json else "\n".join(
        f"{r['setup']} x {r['world']}: {r['largest']} (then {r['first_failure']})" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="run one rank (under torchrun)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--offload", default="none", choices=["none", "cpu"])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warmup step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="(worker) folder for rankN.json")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per setup and world size")
    p.add_argument("--probe", default=None, metavar="PRESETS",
                   help="presets, smallest first: report the largest that trains")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.probe:
        return probe(args)
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for setup in args.setups.split(","):
            ranks = run_setup(setup, world, args, args.timeout)
            worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
            rows.append({"setup": setup, "world": world, "params_MB": worst["params"] / 2**20,
                         "grads_MB": worst["grads"] / 2**20, "optimizer_MB": worst["optimizer"] / 2**20,
                         "peak_MB": max(r["peak_bytes"] for r in ranks) / 2**20,
                         "peak_after_build_MB": max(r["peak_after_build_bytes"] for r in ranks) / 2**20,
                         "step_s": max(r["step_s"] for r in ranks), "parameters": worst["parameters"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
        return
    print("| setup | ranks | params MB/rank | grads MB/rank | optimizer MB/rank | peak after build MB/rank "
          "| peak MB/rank | step s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setup']} | {r['world']} | {r['params_MB']:.1f} | {r['grads_MB']:.1f} | {r['optimizer_MB']:.1f} "
              f"| {r['peak_after_build_MB']:.0f} | {r['peak_MB']:.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
