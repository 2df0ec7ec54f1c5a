"""Train a model from a preset or config file, or instruction-tune a checkpoint.

  andromeda train --preset llama-tiny --out runs/x --max-steps 50
  andromeda train --config model.json --set train.lr=1e-3 --data data/ --out runs/y
  andromeda train --out runs/y --resume                  (continue exactly where it stopped)
  andromeda train --sft dolly.jsonl --init runs/x/checkpoints/latest --out runs/sft
  andromeda train --preset llama-tiny --data data/ --distill-from runs/big --out runs/student

`--set` takes model keys (attention.heads=4) and training keys (train.lr=3e-4, see
andromeda.train.config.TrainConfig). Without --data, the embedded default corpus is
prepared into RUN_DIR/data. A one-line summary is printed and the resolved config saved as
RUN_DIR/run_config.json once every check has passed; the last line printed is the path of
the final checkpoint. Under torchrun, every process trains its share (DDP) and rank 0 writes
the run folder; train.batch_size is per process. `--set train.parallel=fsdp` shards the
model, optimizer and checkpoints over the processes (FSDP2; without torchrun, a world of one),
and `--set train.offload=cpu` keeps the shards in host memory (docs/training.md):

  torchrun --nproc_per_node 8 -m andromeda train --preset andromeda-7b --set train.parallel=fsdp --out runs/7b

Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and exits with
130 or 143; a second Ctrl-C stops at once. `--resume` continues from the newest intact
checkpoint and refuses when there is none. One run at a time may use a run folder: a second
`train` on the same --out refuses and names the pid of the first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from andromeda.train.interrupt import TrainingInterrupted
from andromeda.train.run import resolve_run, train_run
from andromeda.train.runlock import RunLock


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="named model config (see `andromeda presets`)")
    src.add_argument("--config", metavar="FILE", help="JSON model config, or {\"model\": ..., \"train\": ...}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field (attention.heads=4) or a training field (train.lr=3e-4)")
    p.add_argument("--data", metavar="DIR", help="prepared data folder (`andromeda prepare`)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (checkpoints, metrics, config)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--batch-size", metavar="N|auto",
                   help="sequences per micro-batch (train.batch_size); 'auto' finds the largest that fits "
                        "on the GPU and keeps batch_size x grad_accum by accumulation")
    p.add_argument("--seed", type=int, help="random seed (default 1337)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of RUN_DIR")
    p.add_argument("--sft", metavar="FILE.jsonl", help="instruction-tune on Dolly-style or chat records")
    p.add_argument("--init", metavar="CKPT", help="start from the weights (and tokenizer) of this checkpoint")
    p.add_argument("--distill-from", metavar="TEACHER_CKPT",
                   help="knowledge distillation: also learn the soft targets of this trained checkpoint (same "
                        "tokenizer); mix and temperature: train.distill_alpha, train.distill_temperature")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    # Under torchrun every rank runs this; rank 0 alone writes the folder and holds its lock.
    lock = RunLock(Path(args.out)) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        plan = resolve_run(args)
        try:
            final = train_run(plan, progress=not args.no_progress)
        except TrainingInterrupted as stop:
            if plan.is_main:
                print(f"stopped by {signal.Signals(stop.signum).name} at step {stop.step}; saved {stop.checkpoint}; "
                      f"continue with: andromeda train --out {args.out} --resume", file=sys.stderr, flush=True)
            return stop.exit_code
    if plan.is_main:
        print(final, flush=True)
    return 0
