"""nanoGPT's CPU recipe side by side: Tiny Shakespeare at character level, 4 layers x 128,
context 64, batch 12, 2000 steps, lr 1e-3 (nanoGPT README, "I only have a macbook"), trained
by nanoGPT's own train.py and by `andromeda train` on the same text, split and thread count.

    python benchmarks/nanogpt_cpu.py --nanogpt PATH_TO_NANOGPT_CLONE [--threads 2] [--json]

nanoGPT is the peer, not part of this repository: give a clone of
https://github.com/karpathy/nanoGPT (its train.py and model.py are run as they are, from a
scratch folder holding its data files). Without --nanogpt only andromeda runs.

Reported for each: wall time of the training process, its own val-loss estimates during
training (nanoGPT: 20 random batches every 250 steps; andromeda: `train.eval_batches` windows)
with the elapsed time of each, and the final model's loss on the WHOLE validation split,
scored by this script the same way for both (consecutive 64-character windows, every target
character counted once), so the noisy in-training estimates are not the comparison. The
target (DESIGN.md): andromeda reaches nanoGPT's final val loss in <= 0.5x nanoGPT's wall time.

Both trainers get the same data: the first 90% of the text for training, the last 10% for
validation (nanoGPT's prepare.py rule; andromeda's `prepare --val-fraction 0.1` cuts the
same place to within one character, plus its end-of-text id).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
WINDOW = 64

# nanoGPT README's CPU command (config/train_shakespeare_char.py plus these overrides).
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]

# The same budget for andromeda: the shakespeare-char preset (RoPE, RMSNorm, SwiGLU) at
# nanoGPT's CPU size, nanoGPT's schedule (lr 1e-3 -> 1e-4, 100 warmup steps, beta2 0.99),
# compiled (eager runs RoPE and RMSNorm as separate elementwise ops, ~1.35x nanoGPT's step
# time at this size; compiled, the step costs what nanoGPT's does). Evaluated every 100 steps
# so the time to the target is resolved finely; `--set train.compile=false` runs it eager.
ANDROMEDA_SETS = ["dim=128", "depth=4", "attention.heads=4", "attention.kv_heads=4", "max_seq_len=64",
                  "embed_dropout=0.0", "mlp.dropout=0.0", "train.seq_len=64", "train.batch_size=12",
                  "train.lr=1e-3", "train.min_lr_ratio=0.1", "train.beta2=0.99", "train.warmup_frac=0.05",
                  "train.eval_every=100", "train.eval_batches=20", "train.log_every=50", "train.dtype=fp32",
                  "train.device=cpu", "train.compile=true"]


def write_nanogpt_data(text: str, folder: Path) -> None:
    """train.bin / val.bin / meta.pkl as nanoGPT's data/shakespeare_char/prepare.py writes them."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def timed_run(name: str, cmd: list[str], cwd: Path, env: dict, log: Path,
              timeout: float) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd`, stamping each output line with the seconds since the start; bounded by `timeout`."""
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                stamp = time.monotonic() - start
                lines.append((stamp, line.rstrip("\n")))
                out.write(f"{stamp:9.2f} {line}")
                if stamp > timeout:
                    raise TimeoutError
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except (TimeoutError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            sys.exit(f"error: {name} ran past {timeout:.0f} s; see {log}")
    if proc.returncode != 0:
        sys.exit(f"error: {name} exited with {proc.returncode}; see {log}")
    return time.monotonic() - start, lines


def run_nanogpt(nanogpt: Path, text: str, work: Path, env: dict, timeout: float, compile_model: bool) -> dict:
    scratch = work / "nanogpt"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "config").mkdir(parents=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(nanogpt / name, scratch / name)
    shutil.copy(nanogpt / "config" / "train_shakespeare_char.py", scratch / "config")
    write_nanogpt_data(text, scratch / "data" / "shakespeare_char")
    cmd = [sys.executable, "-u", "train.py", *NANOGPT_ARGS, "--out_dir=out", "--always_save_checkpoint=True"]
    if compile_model:
        cmd.append("--compile=True")  # configurator.py: the last assignment wins
    wall, lines = timed_run("nanoGPT's train.py", cmd, scratch, env, work / "nanogpt.log", timeout)
    evals = [(t, int(m[1]), float(m[2])) for t, s in lines
             if (m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", s))]
    final_loss = score_nanogpt(scratch, env)
    rows = [{"step": s, "val_loss": v, "elapsed_s": round(t, 1)} for t, s, v in evals]
    return {"wall_s": round(wall, 1), "evals": rows,
            "full_val_loss": final_loss}


def score_nanogpt(scratch: Path, env: dict) -> float:
    """The saved final model's loss on the whole val.bin, in a child process that imports
    nanoGPT's model.py (the windows as in `window_loss`)."""
    # With targets given, nanoGPT's forward returns the logits of every position (without,
    # only the last one); the dummy targets' loss is ignored.
    code = (
        "import sys, json, torch, numpy as np\n"
        "from model import GPT, GPTConfig\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "from nanogpt_cpu import window_loss\n"
        "ck = torch.load('out/ckpt.pt', map_location='cpu', weights_only=False)\n"
        "m = GPT(GPTConfig(**ck['model_args']))\n"
        "m.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in ck['model'].items()})\n"
        "m.eval()\n"
        "ids = torch.from_numpy(np.fromfile('data/shakespeare_char/val.bin', dtype=np.uint16).astype(np.int64))\n"
        "print(json.dumps(window_loss(lambda x: m(x, x)[0], ids)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        sys.exit(f"error: scoring nanoGPT's checkpoint failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def window_loss(logits_of, ids) -> float:
    """Mean next-token loss over consecutive windows of WINDOW + 1 ids (each window predicts
    its last WINDOW ids from what precedes them inside it), batched; every target once."""
    import torch
    import torch.nn.functional as F

    n = (len(ids) - 1) // WINDOW
    x = ids[: n * WINDOW].view(n, WINDOW)
    y = ids[1: n * WINDOW + 1].view(n, WINDOW)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            logits = logits_of(x[i:i + 256]).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + 256].reshape(-1),
                                     reduction="sum").item()
    return round(total / (n * WINDOW), 4)


def run_andromeda(text_path: Path, work: Path, env: dict, threads: int, steps: int, extra: list[str],
                  timeout: float) -> dict:
    data, run = work / "andromeda-data", work / "andromeda-run"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "andromeda", "prepare", "--data", str(text_path), "--tokenizer", "char",
                    "--val-fraction", "0.1", "--out", str(data)], env=env, check=True, capture_output=True,
                   timeout=600)
    sets = [a for s in ANDROMEDA_SETS + extra for a in ("--set", s)]
    cmd = [sys.executable, "-u", "-m", "andromeda", "train", "--preset", "shakespeare-char", "--data", str(data),
           "--out", str(run), "--max-steps", str(steps), "--threads", str(threads), "--no-progress",
           "--set", f"train.save_every={steps}", *sets]
    wall, lines = timed_run("andromeda train", cmd, REPO, env, work / "andromeda.log", timeout)
    # metrics.jsonl's elapsed_s counts from the trainer's start, which is about when the
    # one-line summary is printed; add that moment so both trainers' times count from launch.
    started = next((t for t, s in lines if s.startswith("train:")), 0.0)
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    evals = [{"step": r["step"], "val_loss": round(r["val_loss"], 4), "elapsed_s": round(started + r["elapsed_s"], 1)}
             for r in rows if "val_loss" in r]
    return {"wall_s": round(wall, 1), "evals": evals, "full_val_loss": score_andromeda(run, text_path)}


def score_andromeda(run: Path, text_path: Path) -> float:
    """The final checkpoint's loss on the same validation characters (the last 10% of the text)."""
    import torch

    from andromeda.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(run / "checkpoints" / "latest")
    model.eval()
    text = text_path.read_text()
    ids = torch.tensor(tokenizer.encode(text[int(len(text) * 0.9):]), dtype=torch.long)
    return window_loss(lambda x: model(x), ids)


PEERS = ("nanogpt", "nanogpt-compiled", "andromeda")


def first_reach(evals: list[dict], target: float):
    return next((e for e in evals if e["val_loss"] <= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path, help="a clone of karpathy/nanoGPT (the peer); omit to run andromeda only")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="Tiny Shakespeare (default: ../shared/data)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "nanogpt_cpu", help="scratch folder")
    p.add_argument("--threads", type=int, default=2, help="threads for both trainers (OMP_NUM_THREADS)")
    p.add_argument("--nanogpt-compile", action="store_true",
                   help="also run nanoGPT with --compile=True (its README turns compile off on CPU)")
    p.add_argument("--steps", type=int, default=2000, help="andromeda's steps (nanoGPT runs its 2000)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra andromeda setting (repeatable), e.g. train.lr=3e-3")
    p.add_argument("--target", type=float, default=None,
                   help="val loss to time to (default: nanoGPT's last in-training estimate)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per training run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.text.is_file():
        sys.exit(f"error: {args.text} not found; pass --text PATH to Tiny Shakespeare")
    if args.nanogpt is not None and not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: {args.nanogpt} has no train.py; pass a clone of karpathy/nanoGPT")
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    text = args.text.read_text()
    result: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "load_average_at_start": round(os.getloadavg()[0], 2)}
    if args.nanogpt is not None:
        result["nanogpt"] = run_nanogpt(args.nanogpt, text, args.work, env, args.timeout, False)
        if args.nanogpt_compile:
            result["nanogpt-compiled"] = run_nanogpt(args.nanogpt, text, args.work, env, args.timeout, True)
    result["andromeda"] = run_andromeda(args.text, args.work, env, args.threads, args.steps, args.extra, args.timeout)
    target = args.target
    if target is None and "nanogpt" in result and result["nanogpt"]["evals"]:
        target = result["nanogpt"]["evals"][-1]["val_loss"]
    if target is not None:
        result["target_val_loss"] = target
        for name in PEERS:
            if name in result:
                hit = first_reach(result[name]["evals"], target)
                result[name]["seconds_to_target"] = hit["elapsed_s"] if hit else None
        a, n = result["andromeda"].get("seconds_to_target"), result.get("nanogpt", {}).get("seconds_to_target")
        if a and n:
            result["time_ratio_andromeda_over_nanogpt"] = round(a / n, 3)
        c = result.get("nanogpt-compiled", {}).get("seconds_to_target")
        if a and c:
            result["time_ratio_andromeda_over_nanogpt_compiled"] = round(a / c, 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in PEERS:
        if name in result:
            r = result[name]
            print(f"{name:>16}: wall {r['wall_s']} s, full-val loss {r['full_val_loss']}, "
                  f"in-training val {[(e['step'], e['val_loss']) for e in r['evals']]}, "
                  f"seconds to {target}: {r.get('seconds_to_target')}")
    for key in ("time_ratio_andromeda_over_nanogpt", "time_ratio_andromeda_over_nanogpt_compiled"):
        if key in result:
            print(f"{key} (time to val {target}): {result[key]}x")


if __name__ == "__main__":
    main()
