#!/usr/bin/env bash
# Knowledge distillation on Tiny Shakespeare, character level: a teacher (4 layers x 128), then
# a student with about 1/4 of its parameters (4 layers x 64) trained the same number of steps
# twice, on the hard labels alone and with --distill-from the teacher; prints each val loss.
# Split as nanoGPT does: first 90% of the text for training, last 10% for validation.
#
#   bash benchmarks/distill_shakespeare.sh [TEXT_FILE]
#   TEACHER_STEPS=600 STEPS=300 bash benchmarks/distill_shakespeare.sh    (the RESULTS.md run)
set -euo pipefail
TEXT=${1:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-runs/distill-shakespeare}
TEACHER_STEPS=${TEACHER_STEPS:-600}
STEPS=${STEPS:-300}
COMMON=(--preset llama-tiny --set depth=4 --set attention.heads=4 --set attention.kv_heads=2
        --set train.batch_size=16 --set train.seq_len=128 --set train.lr=3e-3 --set train.eval_every=0
        --set train.eval_batches=40 --set train.compile=false --no-progress)
rm -rf "$OUT"
andromeda prepare --data "$TEXT" --tokenizer char --val-fraction 0.1 --out "$OUT/data"
andromeda train "${COMMON[@]}" --set dim=128 --data "$OUT/data" --out "$OUT/teacher" --max-steps "$TEACHER_STEPS"
andromeda train "${COMMON[@]}" --set dim=64 --data "$OUT/data" --out "$OUT/student" --max-steps "$STEPS"
andromeda train "${COMMON[@]}" --set dim=64 --data "$OUT/data" --out "$OUT/distilled" --max-steps "$STEPS" \
  --distill-from "$OUT/teacher" --set train.distill_alpha=0.5 --set train.distill_temperature=2
for run in teacher student distilled; do
  python - "$OUT/$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
vals = [json.loads(s)["val_loss"] for s in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in s]
cfg = json.loads((run / "run_config.json").read_text())
print(f"{run.name}: dim {cfg['model']['dim']}, steps {cfg['train']['max_steps']}, final val loss {vals[-1]:.4f}")
PY
done
