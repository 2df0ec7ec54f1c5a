"""Is one checkout of andromeda slower than another? CPU time per operation, alternated.

    python benchmarks/compare_versions.py --before DIR_A --after DIR_B [--rounds 15] [--json OUT.json]

DIR_A and DIR_B are two checkouts (git worktrees) of this repository. Wall-clock figures on a
shared machine move by 2x from minute to minute, so this does not compare two runs made one
after the other. It starts one worker process per checkout (PYTHONPATH set to it, one thread),
each building the same cases once, and then asks them in turn to run each case once, swapping
which goes first every round. Each answer is the worker's CPU time (`time.process_time`) for that
run; the figure kept per case is the minimum over the rounds, the least-disturbed run, and the
ratio after/before of those minima is reported with the median of the per-round ratios.

Cases: batch-1 greedy decoding of the 6x384 Llama-shaped model of benchmarks/cpu_decode.py
(eager and compiled, 128 new tokens, built by each checkout's own cpu_decode.py), and for each
tiny preset an eval forward (8 x 256 tokens), a training step (forward, backward, AdamW) and eager
decoding (64 new tokens). Both checkouts run the same weights: the --before worker initialises
each preset and saves it as a checkpoint, which the --after worker loads (older tensor names are
mapped on load). That matters beyond fairness: Mixture-of-Depths routes tokens at inference by a
learned predictor, so two random initialisations send different numbers of tokens through
their blocks and would cost different work. A preset whose definition differs between the
checkouts is reported with its parameter counts so the reader can tell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESETS = ("llama-tiny", "moe-tiny", "jamba-tiny", "anemone-bf16-tiny", "anemone-tiny")


# ----- the worker: runs inside one checkout --------------------------------------------------

def build_cases(tree: Path, weights: Path, save: bool) -> dict:
    """name -> (callable running the case once, units of work it does, parameters). With `save`,
    each preset's model is initialised and saved under `weights`; otherwise loaded from there."""
    import importlib.util

    import torch

    from andromeda.checkpoint import load_checkpoint, save_checkpoint
    from andromeda.infer.engine import Engine
    from andromeda.infer.sampling import SamplingParams
    from andromeda.model.transformer import Transformer
    from andromeda.presets import get_preset

    spec = importlib.util.spec_from_file_location("cpu_decode", tree / "benchmarks" / "cpu_decode.py")
    cpu_decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_decode)

    cases = {}
    prompt = list(range(1, 17))
    llama = cpu_decode.andromeda_from_llama(cpu_decode.hf_llama(320, 384, 6, 6, 1024, 512, seed=0))
    n_llama = sum(p.numel() for p in llama.parameters())
    for compiled in (False, True):
        engine = Engine(llama, tokenizer=None, compile=compiled)
        params = SamplingParams(max_new_tokens=128, temperature=0.0, stop_at_eos=False)
        engine.generate([prompt], params)  # warm-up (and compilation)
        cases[f"6x384 decode {'compiled' if compiled else 'eager'}"] = (
            lambda e=engine, p=params: e.generate([prompt], p), 128, n_llama)
    for name in PRESETS:
        torch.manual_seed(0)
        if save:
            model = Transformer(get_preset(name))
            save_checkpoint(weights / name, model, meta={})
        else:
            model = load_checkpoint(weights / name)[0]
        cfg = model.cfg
        n = sum(p.numel() for p in model.parameters())
        torch.manual_seed(1)  # the same tokens in both workers, whatever the init drew
        x = torch.randint(0, cfg.vocab_size, (8, 256))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def forward(m=model, x=x):
            m.eval()
            with torch.inference_mode():
                m(x)

        def train_step(m=model, x=x, opt=optimizer):
            m.train()
            logits = m(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()

        engine = Engine(model, tokenizer=None)
        params = SamplingParams(max_new_tokens=64, temperature=0.0, stop_at_eos=False)

        def decode(e=engine, p=params, m=model):
            m.eval()
            e.generate([prompt], p)

        for label, fn, units in (("eval", forward, x.numel()), ("train", train_step, x[:, :-1].numel()),
                                 ("decode eager", decode, 64)):
            fn()  # warm-up
            cases[f"{name} {label}"] = (fn, units, n)
    return cases


def worker(tree: Path, weights: Path, save: bool) -> None:
    import time

    import torch

    torch.set_num_threads(1)
    cases = build_cases(tree, weights, save)
    print(json.dumps({name: {"units": u, "params": n} for name, (_, u, n) in cases.items()}), flush=True)
    for line in sys.stdin:
        fn = cases[line.strip()][0]
        start = time.process_time()
        fn()
        print(time.process_time() - start, flush=True)


# ----- the driver ------------------------------------------------------------------------------

class Worker:
    def __init__(self, tree: Path, weights: Path, save: bool):
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", str(tree), "--weights", str(weights)]
        self.proc = subprocess.Popen(cmd + (["--save"] if save else []), env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"compare_versions: the worker for {tree} failed to start")
        self.cases = json.loads(line)

    def run(self, case: str) -> float:
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"compare_versions: a worker died running {case!r}")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare(before: Path, after: Path, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as weights:
        workers = {"before": Worker(before, Path(weights), save=True)}  # saves first, then...
        workers["after"] = Worker(after, Path(weights), save=False)  # ...the same weights load here
        return _alternate(workers, rounds)


def _alternate(workers: dict, rounds: int) -> dict:
    try:
        names = [c for c in workers["before"].cases if c in workers["after"].cases]
        times: dict = {side: {c: [] for c in names} for side in workers}
        for r in range(rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for case in names:
                for side in order:
                    times[side][case].append(workers[side].run(case))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for case in names:
        units = workers["before"].cases[case]["units"]
        b, a = min(times["before"][case]), min(times["after"][case])
        paired = [tb / ta for tb, ta in zip(times["before"][case], times["after"][case])]
        rows.append({"case": case, "before_per_cpu_s": units / b, "after_per_cpu_s": units / a,
                     "after_over_before": b / a, "median_paired_ratio": statistics.median(paired),
                     "params_before": workers["before"].cases[case]["params"],
                     "params_after": workers["after"].cases[case]["params"]})
    return {"machine": cpu_name(), "rounds": rounds, "rows": rows}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(report: dict) -> None:
    print(f"{'case':34s} {'before/cpu-s':>13s} {'after/cpu-s':>12s} {'after/before':>12s} {'median pair':>11s}")
    for r in report["rows"]:
        note = "" if r["params_before"] == r["params_after"] else \
            f"  (params {r['params_before']:,} -> {r['params_after']:,})"
        print(f"{r['case']:34s} {r['before_per_cpu_s']:13.1f} {r['after_per_cpu_s']:12.1f} "
              f"{r['after_over_before']:11.2f}x {r['median_paired_ratio']:10.2f}x{note}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="checkout to compare against")
    p.add_argument("--after", type=Path, help="checkout under test")
    p.add_argument("--rounds", type=int, default=15, help="alternations per case (the minimum is kept)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.weights, args.save)
        return {}
    if not (args.before and args.after):
        p.error("give --before DIR and --after DIR (two checkouts of this repository)")
    report = compare(args.before.resolve(), args.after.resolve(), args.rounds)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
