"""Run metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Offers `MetricsLog(run_dir, resume_step, tensorboard)` with `log(record)` and `close()`, and
`read_metrics(run_dir)`. Train lines carry step, loss, lr, tokens_per_s, elapsed_s (and mfu
when the device peak is known, routing statistics for MoE/MoA/MoD models); validation lines
carry step, val_loss, elapsed_s.
On resume, lines past the resumed step (written after the checkpoint by the interrupted
process) are dropped, so the file always describes one consistent history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

METRICS = "metrics.jsonl"


def routing_metrics(stats: dict) -> dict:
    """Layer statistics (`ModelOutput.stats`) as loggable values: a per-expert load
    vector (share of routing assignments per expert) becomes a list plus
    `<key>/max_over_mean` (1.0 is a perfectly balanced layer, E means one expert takes
    everything); scalar statistics (Mixture-of-Depths fractions, predictor accuracy) stay
    scalars. Called on logging steps only: reading the values syncs with the device."""
    out = {}
    for key, value in sorted(stats.items()):
        values = value.detach().float().reshape(-1).tolist()
        if len(values) == 1:
            out[key] = round(values[0], 6)
        elif values:
            mean = sum(values) / len(values)
            out[key] = [round(v, 6) for v in values]
            out[key + "/max_over_mean"] = round(max(values) / mean, 6) if mean > 0 else 0.0
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return out


def _truncate(path: Path, keep_through: int) -> None:
    if not path.exists():
        return
    kept = [r for r in read_metrics(path.parent) if r.get("step", 0) <= keep_through]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard", resume_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _tensorboard_writer(folder: Path, resume_step: int) -> Optional[object]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
    return writer
