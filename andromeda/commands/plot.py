"""Plot the loss curves of a training run: train and validation loss against steps and
against wall-clock time, from RUN_DIR/metrics.jsonl. Needs matplotlib (the `plot` extra).

  andromeda plot runs/x                 (writes runs/x/loss.png)
  andromeda plot runs/x --out curves.png
"""

from __future__ import annotations

from pathlib import Path

from andromeda.errors import UserError
from andromeda.train.metrics import METRICS, read_metrics


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `andromeda train`")
    p.add_argument("--out", metavar="FILE.png", help="image to write (default RUN_DIR/loss.png)")
    p.add_argument("--log-y", action="store_true", help="logarithmic loss axis")


def _series(records: list[dict], key: str) -> tuple[list, list, list]:
    rows = [r for r in records if key in r]
    return [r["step"] for r in rows], [r.get("elapsed_s", 0.0) / 60 for r in rows], [r[key] for r in rows]


def plot_run(run_dir: Path, out: Path, log_y: bool = False) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir / METRICS} is missing or empty; train first")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'andromeda[plot]'") from None
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in (("loss", "train", "-"), ("val_loss", "val", "o-")):
        steps, minutes, values = _series(records, key)
        if values:
            by_step.plot(steps, values, style, label=label, markersize=3)
            by_time.plot(minutes, values, style, label=label, markersize=3)
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock (minutes)")
    for ax in (by_step, by_time):
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
        if log_y:
            ax.set_yscale("log")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out


def run(args) -> int:
    out = Path(args.out) if args.out else Path(args.run_dir) / "loss.png"
    print(plot_run(Path(args.run_dir), out, args.log_y))
    return 0
