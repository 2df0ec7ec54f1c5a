"""Architecture comparison at matched active parameters: dense, MoE, Jamba, BitNet b1.58 and
the anemone family, trained on the same characters with the same token budget and schedule.

    python benchmarks/arch_compare.py --data ../shared/data/tinyshakespeare.txt --steps 600 \
        --out runs/arch_compare [--models dense,moe] [--threads 1]

Writes OUT/results.json, OUT/arch_compare.md (the table) and OUT/arch_compare.png (validation
loss against tokens seen, and the final loss of each model with its training speed). Each model trains through
`andromeda train --config` in its own process (OUT/runs/NAME, log in OUT/runs/NAME.log), one at
a time; a finished run with the same config is reused, so an interrupted comparison continues.

Method (benchmarks/arch_compare.md has the results):
- Data: the text is prepared at character level, first 90% train, last 10% validation.
- Models: every one starts from its preset's `-tiny` config (andromeda/presets.py) resized to
  one shape (`--dim`, `--depth`, context `--seq-len`, 4 query / 2 KV heads); the dense baseline
  is that same decoder (RoPE, RMSNorm pre-norm, SwiGLU, GQA) without the family sections.
- Matched active parameters: one knob per model, the FFN width `h` (dense MLP hidden `h`,
  each MoE expert `h / top_k`, so a token's top-k experts have the dense FFN's width), is
  searched in steps of 8 so that active parameters (`count_parameters`) come closest to the
  dense model's. Mamba layers hold more weights than attention layers at this width, so
  Jamba-style models get a narrower FFN.
- The score is the loss per character over the whole validation split (consecutive windows
  of `--seq-len`, eval mode), after the last step. The curves use the trainer's periodic
  validation (the same `--eval-batches` windows at every pass).
- Speed is the median of the trainer's logged tokens/s (the few logged intervals that hold a
  validation pass are slower; the median leaves them out).
- Mixture-of-Depths models are also scored with training's top-k routing (not causal, so not a
  valid score) next to the causal predictor used at inference, with the share of tokens the
  predictor routes per block: the gap is what the switch to the predictor costs.

Offers `MODELS`, `model_dict`, `match_ffn_width`, `model_configs`, `param_summary`,
`val_loss_full`, `mod_diagnostics`, `read_metrics`, `markdown_table`, `mod_table`, `plot`, `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from andromeda.model import ModelConfig, build_model, count_parameters
from andromeda.presets import preset_dict

# name -> (preset it starts from, what it adds over the dense baseline, changes to the preset's
# family sections: families removed, layout patterns replaced). The two jamba-* rows and anemone-bf16-mod1
# are ablations that split anemone-bf16's additions over jamba apart.
MODELS: dict[str, tuple[str, str, dict]] = {
    "dense": ("moe-tiny", "Llama-style decoder (preset families removed)", {"drop": ("moe",)}),
    "moe": ("moe-tiny", "every FFN: 4 experts, top-2", {}),
    "jamba": ("jamba-tiny", "Mamba-2 mixers, attention 1 in 4, MoE every other layer", {}),
    "jamba-moa": ("anemone-bf16-tiny", "jamba, attention as MoA heads (4 experts, top-2)", {"drop": ("mod",)}),
    "jamba-mod": ("anemone-bf16-tiny", "jamba + MoD (capacity 0.25) on blocks 0, 2",
                  {"drop": ("moa",), "layout": {"routing": "mod,none"}}),
    # The anemone rows pin MoD to blocks 0, 2 (the placement these results were measured with);
    # the presets now route the odd blocks instead, which is the anemone-bf16-mod1 row.
    "anemone-bf16": ("anemone-bf16-tiny", "jamba + MoD on blocks 0, 2 + MoA heads",
                     {"layout": {"routing": "mod,none"}}),
    "anemone-bf16-mod1": ("anemone-bf16-tiny", "anemone-bf16 with MoD on blocks 1, 3 (off attention)",
                          {"layout": {"routing": "none,mod"}}),
    "bitnet": ("bitnet-tiny", "dense with ternary attention + MLP (BitLinear b1.58)", {}),
    "anemone": ("anemone-tiny", "anemone-bf16, ternary MLP/experts and Mamba", {"layout": {"routing": "mod,none"}}),
    "anemone-1.58": ("anemone-1.58-tiny", "anemone-bf16, every projection ternary",
                     {"layout": {"routing": "mod,none"}}),
}

TRAIN_DEFAULTS = {"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_frac": 0.05, "beta2": 0.99, "weight_decay": 0.1,
                  "grad_clip": 1.0, "dtype": "fp32", "device": "cpu", "log_every": 10, "save_every": 0,
                  "keep_last": 1, "tensorboard": False}


def model_dict(name: str, ffn_width: int, vocab: int, seq_len: int, dim: int, depth: int) -> dict:
    """The config of model `name` at the shared shape, FFN width `ffn_width`."""
    preset, _, changes = MODELS[name]
    d = preset_dict(preset)
    d.update(vocab_size=vocab, max_seq_len=seq_len, dim=dim, depth=depth)
    d["attention"].update(heads=4, kv_heads=2)  # bitnet-tiny is MHA; one attention shape for all
    layout = d.setdefault("layout", {})
    for family in changes.get("drop", ()):
        del d[family]
        if family == "moa":
            layout["mixer"] = layout["mixer"].replace("moa", "attention")
        else:
            layout[{"moe": "ffn", "mod": "routing"}[family]] = {"moe": "dense", "mod": "none"}[family]
    layout.update(changes.get("layout", {}))
    d["mlp"]["hidden_dim"] = ffn_width
    moe = d.get("moe")
    if moe is not None:
        moe["hidden_dim"] = max(1, ffn_width // moe["top_k"])
    return d


def param_summary(d: dict) -> dict:
    """Total and active parameters, and the inference weight size: bf16 for full-precision
    weights, 2 bits per ternary weight plus one float32 scale per matrix (per expert)."""
    from andromeda.quant.bitpack import ternary_bytes

    model = build_model(ModelConfig.from_dict(copy.deepcopy(d)))  # real tensors: bitpack reads shapes
    total, active = count_parameters(model)
    ternary_bf16, ternary_packed = ternary_bytes(model)
    return {"total": total, "active": active, "ternary": ternary_bf16 // 2,
            "weight_bytes": 2 * total - ternary_bf16 + ternary_packed}


def _active(d: dict) -> int:
    return count_parameters(build_model(ModelConfig.from_dict(copy.deepcopy(d)), device="meta"))[1]


def match_ffn_width(name: str, target: int, step: int = 8, **shape) -> int:
    """The FFN width (multiple of `step`, at least 2 * step) whose active parameters come
    closest to `target`. Active parameters grow with the width, so a bisection finds it."""
    lo, hi = 2, 2
    while _active(model_dict(name, hi * step, **shape)) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _active(model_dict(name, mid * step, **shape)) < target else (lo, mid)
    return step * min((lo, hi), key=lambda w: abs(_active(model_dict(name, w * step, **shape)) - target))


def model_configs(names: list[str], vocab: int, seq_len: int, dim: int, depth: int) -> dict[str, dict]:
    """name -> model dict, every model's active parameters matched to the dense one's (SwiGLU
    width 8/3 * dim rounded up to 16, the `-tiny` presets' rule)."""
    shape = {"vocab": vocab, "seq_len": seq_len, "dim": dim, "depth": depth}
    dense_width = 16 * math.ceil(int(8 * dim / 3) / 16)
    target = _active(model_dict("dense", dense_width, **shape))
    return {name: model_dict(name, dense_width if name in ("dense", "bitnet")
                             else match_ffn_width(name, target, **shape), **shape) for name in names}


@torch.no_grad()
def val_loss_full(model: torch.nn.Module, data_dir: Path, seq_len: int, batch_size: int = 32,
                  stats: dict | None = None, train_mode: bool = False) -> tuple[float, int]:
    """(mean loss per target, number of targets) over the whole validation split, in
    consecutive windows: every token but the first is predicted exactly once. Eval mode
    unless `train_mode` (which only Mixture-of-Depths changes: top-k routing over each
    window, not causal). `stats`, when given, receives the target-weighted mean of each
    scalar statistic the model returns (e.g. MoD's routed fraction per layer)."""
    import torch.nn.functional as F

    from andromeda.data.loader import iter_eval_windows

    model.train(train_mode)
    total, count, sums = 0.0, 0, {}
    for x, y, _ in iter_eval_windows(str(data_dir), "val", seq_len, batch_size):
        out = model(x, with_aux=True)
        total += float(F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += y.numel()
        for key, value in out.stats.items():
            if value.numel() == 1:
                sums[key] = sums.get(key, 0.0) + float(value) * y.numel()
    model.eval()
    if stats is not None:
        stats.update({key: value / count for key, value in sums.items()})
    return total / count, count


def mod_diagnostics(model: torch.nn.Module, data_dir: Path, seq_len: int) -> dict:
    """For Mixture-of-Depths models: the validation loss with training's top-k routing (not
    causal, so not a valid score: it shows what the causal predictor used at inference costs),
    the share of tokens the predictor routes through each MoD block at inference, and the
    predictor's agreement with top-k."""
    routed, agree = {}, {}
    topk_loss, _ = val_loss_full(model, data_dir, seq_len, stats=agree, train_mode=True)
    val_loss_full(model, data_dir, seq_len, stats=routed)
    return {"val_loss_topk": topk_loss,
            "mod_routed_eval": {k.split("/")[-1]: v for k, v in routed.items() if k.startswith("mod_fraction")},
            "mod_predictor_acc": {k.split("/")[-1]: v for k, v in agree.items() if k.startswith("mod_predictor")}}


def read_metrics(run_dir: Path, tokens_per_step: int) -> dict:
    """Curves and speed from RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]  # first has startup
    return {"train_curve": [[r["step"] * tokens_per_step, r["loss"]] for r in train],
            "val_curve": [[r["step"] * tokens_per_step, r["val_loss"]] for r in val],
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "train_seconds": rows[-1]["elapsed_s"] if rows else None}


def train_one(name: str, model: dict, train: dict, data_dir: Path, out: Path, steps: int, seed: int,
              threads: int) -> dict:
    """Train model `name` with `andromeda train` in a child process; returns its result."""
    run_dir, log = out / "runs" / name, out / "runs" / f"{name}.log"
    record_path = run_dir / "result.json"
    settings = {"model": model, "train": train, "steps": steps, "seed": seed}
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            print(f"[{name}] reusing the finished run in {run_dir}", flush=True)
            if model.get("mod") and "val_loss_topk" not in record:  # older result file
                record.update(_mod_record(run_dir, steps, data_dir, train["seq_len"]))
                record_path.write_text(json.dumps(record, indent=2))
            return record
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own output, left by another setting
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = out / "configs" / f"{name}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"model": model, "train": train}, indent=2))
    cmd = [sys.executable, "-m", "andromeda", "train", "--config", str(config), "--data", str(data_dir),
           "--out", str(run_dir), "--max-steps", str(steps), "--seed", str(seed), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    record = {"name": name, "settings": settings, "wall_s": time.perf_counter() - started,
              "command": " ".join(cmd), **param_summary(model)}
    if proc.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        record["error"] = f"exit {proc.returncode}: {lines[-1] if lines else 'no output'} (log: {log})"
        print(f"[{name}] FAILED {record['error']}", flush=True)
        return record  # not saved as finished: the next invocation retries it
    record.update(read_metrics(run_dir, train["batch_size"] * train["seq_len"]))
    from andromeda.checkpoint import load_checkpoint
    final = run_dir / "checkpoints" / f"step_{steps:07d}"
    trained, _, _ = load_checkpoint(final)
    record["val_loss"], record["val_targets"] = val_loss_full(trained, data_dir, train["seq_len"])
    if model.get("mod"):
        record.update(_mod_record(run_dir, steps, data_dir, train["seq_len"]))
    curve = record["val_curve"]
    if not math.isfinite(record["val_loss"]) or (len(curve) > 1 and curve[-1][1] >= curve[0][1]):
        record["error"] = "validation loss did not fall"
    record_path.write_text(json.dumps(record, indent=2))
    print(f"[{name}] val loss {record['val_loss']:.4f}, {record['tokens_per_s']:.0f} tokens/s", flush=True)
    return record


def _mod_record(run_dir: Path, steps: int, data_dir: Path, seq_len: int) -> dict:
    from andromeda.checkpoint import load_checkpoint
    trained, _, _ = load_checkpoint(run_dir / "checkpoints" / f"step_{steps:07d}")
    return mod_diagnostics(trained, data_dir, seq_len)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"  # "-": that layer has no MoD in this model


def mod_table(results: list[dict]) -> str:
    """Mixture-of-Depths models: causal (inference) routing against training's top-k."""
    rows = [r for r in results if "val_loss_topk" in r]
    if not rows:
        return ""
    layers = sorted({k for r in rows for k in r["mod_routed_eval"]})
    head = " | ".join(f"routed at inference, block {k.removeprefix('layer')}" for k in layers)
    acc = " | ".join(f"predictor agrees with top-k, block {k.removeprefix('layer')}" for k in layers)
    lines = [f"| model | val loss (causal predictor) | val loss (top-k, not causal) | {head} | {acc} |",
             "| --- | ---: | ---: |" + " ---: |" * (2 * len(layers))]
    for r in rows:
        routed = " | ".join(_percent(r["mod_routed_eval"].get(k)) for k in layers)
        agree = " | ".join(_percent(r["mod_predictor_acc"].get(k)) for k in layers)
        lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {r['val_loss_topk']:.4f} | {routed} | {agree} |")
    return "\n".join(lines) + "\n"


def markdown_table(results: list[dict]) -> str:
    """The results table; deltas are against the dense model when it is present."""
    base = next((r for r in results if r["name"] == "dense" and "val_loss" in r), None)
    lines = [("| model | adds over dense | total params | active params | ternary params | weights (bf16 + 2-bit) "
              "| val loss (nats/char) | vs dense | train tokens/s | vs dense |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        what = MODELS[r["name"]][1] if r["name"] in MODELS else ""
        params = f"| {r['total']:,} | {r['active']:,} | {r['ternary']:,} | {r['weight_bytes'] / 1024:,.0f} KiB "
        if "val_loss" not in r:
            lines.append(f"| {r['name']} | {what} {params}| failed: {r.get('error', '?')} | | | |")
            continue
        dl = f"{r['val_loss'] - base['val_loss']:+.3f}" if base else ""
        ds = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        flag = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['name']} | {what} {params}| {r['val_loss']:.4f}{flag} | {dl} "
                     f"| {r['tokens_per_s']:,.0f} | {ds} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Left: periodic validation loss against tokens seen. Right: final whole-split validation
    loss per model (bars, best first) with its training tokens/s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "val_loss" in r]
    color = {r["name"]: plt.cm.tab10(i % 10) for i, r in enumerate(done)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.15, 1]})
    for r in done:
        tokens, loss = zip(*r["val_curve"])
        style = "--" if r["ternary"] else "-"  # dashed: BitLinear models
        left.plot([t / 1e6 for t in tokens], loss, style, marker=".", color=color[r["name"]], label=r["name"])
    left.set(xlabel="training tokens (millions)", ylabel="validation loss (nats/char)",
             title="validation loss during training (fixed val sample)")
    lows = [min(v for _, v in r["val_curve"]) for r in done]
    if lows:
        left.set_ylim(min(lows) - 0.05, min(lows) + 1.0)  # the interesting part, not the first drop
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    ranked = sorted(done, key=lambda r: r["val_loss"], reverse=True)  # best at the top
    y = range(len(ranked))
    right.barh(y, [r["val_loss"] for r in ranked], color=[color[r["name"]] for r in ranked])
    right.set_yticks(list(y), [r["name"] for r in ranked], fontsize=8)
    for i, r in enumerate(ranked):
        right.text(r["val_loss"], i, f" {r['val_loss']:.3f}  ({r['tokens_per_s'] / 1e3:.1f}k tok/s)",
                   va="center", fontsize=8)
    if ranked:
        losses = [r["val_loss"] for r in ranked]
        right.set_xlim(min(losses) - 0.1, max(losses) + 0.25 * (max(losses) - min(losses) + 0.2))
    right.set(xlabel="final validation loss, whole split (nats/char)",
              title="final loss (training tokens/s on 1 CPU thread)")
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def prepare_data(text: Path, out: Path) -> Path:
    """Character-level shards of `text` (first 90% train, last 10% val), reused if present."""
    from andromeda.data.prepare import prepare
    from andromeda.errors import UserError

    data_dir = out / "data"
    if (data_dir / "meta.json").exists():
        return data_dir
    if not text.is_file():
        raise UserError(f"text file not found: {text}")
    prepare([str(text)], data_dir, "char", val_fraction=0.1, progress=False)
    return data_dir


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the CPU model here
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="text file (prepared at character level)")
    p.add_argument("--out", type=Path, default=Path("runs/arch_compare"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    args = p.parse_args(argv)
    from andromeda.errors import UserError

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise SystemExit(f"error: unknown model {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    if min(args.steps, args.batch_size, args.seq_len, args.dim, args.eval_batches, args.threads) < 1:
        raise SystemExit("error: --steps, --batch-size, --seq-len, --dim, --eval-batches and --threads must be >= 1")
    if args.depth < 4:
        raise SystemExit("error: --depth must be >= 4 so that the Jamba layout has attention, Mamba, MoE and MoD")
    if not (args.out / "data" / "meta.json").exists() and not args.data.is_file():
        raise SystemExit(f"error: text file not found: {args.data}")  # before anything is created
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        data_dir = prepare_data(args.data, args.out)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    from andromeda.data.prepare import open_prepared
    vocab = open_prepared(data_dir).tokenizer.vocab_size
    configs = model_configs(names, vocab, args.seq_len, args.dim, args.depth)
    train = dict(TRAIN_DEFAULTS, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                 eval_every=args.eval_every, eval_batches=args.eval_batches)
    results = [train_one(n, configs[n], train, data_dir, args.out, args.steps, args.seed, args.threads) for n in names]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "steps": args.steps,
               "tokens": args.steps * args.batch_size * args.seq_len, "train": train,
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "results": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    tables = markdown_table(results) + "\n" + mod_table(results)
    (args.out / "arch_compare.md").write_text(tables)
    plot(results, args.out / "arch_compare.png")
    print(tables)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'arch_compare.md'}, {args.out / 'arch_compare.png'}")
    return 1 if any("val_loss" not in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
