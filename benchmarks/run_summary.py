"""Summarise a training run folder: best val loss, and wall time / step when val loss first
reached a threshold. Reads RUN_DIR/metrics.jsonl.

    python benchmarks/run_summary.py runs/shakespeare-char/run --reach 1.47 [--json]
"""

import argparse
import json
from pathlib import Path


def summarise(run_dir: Path, reach: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r and "val_loss" not in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    hit = next((r for r in val if r["val_loss"] <= reach), None)
    tps = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    return {
        "best_val_loss": best["val_loss"] if best else None,
        "best_step": best["step"] if best else None,
        f"step_to_{reach}": hit["step"] if hit else None,
        f"seconds_to_{reach}": hit.get("elapsed_s") if hit else None,
        "final_step": rows[-1]["step"] if rows else None,
        "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--reach", type=float, default=1.47, help="val loss threshold to time")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    summary = summarise(args.run_dir, args.reach)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
