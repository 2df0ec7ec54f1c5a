"""Table and plot of benchmarks/long_context.sh's results.

usage: python benchmarks/long_context_plot.py RUN_DIR [--out benchmarks/long_context.png]
Reads RUN_DIR/eval-*.json (each `andromeda eval --lengths --json`), prints a Markdown table of
loss per length and writes one plot with every curve (andromeda.eval.lengths.plot_lengths).
"""
import argparse
import json
from pathlib import Path

from andromeda.eval.lengths import plot_lengths

CURVES = [("rope", "RoPE, as trained"), ("rope-linear-zero", "RoPE + linear x16, no training"),
          ("rope-ntk-zero", "RoPE + NTK x16, no training"), ("rope-yarn-zero", "RoPE + YaRN x16, no training"),
          ("rope-linear-ft", "RoPE + linear x4, fine-tuned at 1024"),
          ("rope-ntk-ft", "RoPE + NTK x4, fine-tuned at 1024"), ("rope-yarn-ft", "RoPE + YaRN x4, fine-tuned at 1024"),
          ("alibi", "ALiBi (all heads), as trained"), ("alibi-xpos", "ALiBi (half the heads) + xPos, as trained")]

parser = argparse.ArgumentParser()
parser.add_argument("run_dir", type=Path)
parser.add_argument("--out", default="benchmarks/long_context.png")
args = parser.parse_args()
curves = {label: json.loads((args.run_dir / f"eval-{name}.json").read_text())
          for name, label in CURVES if (args.run_dir / f"eval-{name}.json").exists()}
lengths = [r["length"] for r in next(iter(curves.values()))]
print("| model | " + " | ".join(str(n) for n in lengths) + " |")
print("|---|" + "---|" * len(lengths))
for label, rows in curves.items():
    print(f"| {label} | " + " | ".join(f"{r['loss']:.3f}" for r in rows) + " |")
plot_lengths(curves, args.out, title="Tiny Shakespeare (char), trained at 256: loss on the same targets")
print(f"plot: {args.out}")
