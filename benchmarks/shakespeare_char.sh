#!/usr/bin/env bash
# Tiny Shakespeare, character level, with nanoGPT's "baby GPT" budget: 6 layers, 384 wide,
# context 256, batch 64, 5000 steps, peak lr 1e-3 decaying to 1e-4, beta2 0.99, dropout 0.2.
# Split as nanoGPT does: first 90% of the text for training, last 10% for validation.
#
#   bash benchmarks/shakespeare_char.sh [TEXT_FILE]        (GPU: the full run)
#   STEPS=200 BATCH=8 EVAL_EVERY=50 bash benchmarks/shakespeare_char.sh   (CPU smoke run)
#
# Prints the best val loss and the wall time at which val loss first reached 1.47.
set -euo pipefail
TEXT=${1:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-runs/shakespeare-char}
STEPS=${STEPS:-5000}
BATCH=${BATCH:-64}
EVAL_EVERY=${EVAL_EVERY:-250}
EVAL_BATCHES=${EVAL_BATCHES:-50}
COMPILE=${COMPILE:-true}
rm -rf "$OUT"
andromeda prepare --data "$TEXT" --tokenizer char --val-fraction 0.1 --out "$OUT/data"
andromeda train --preset shakespeare-char --data "$OUT/data" --out "$OUT/run" --max-steps "$STEPS" \
  --set train.batch_size="$BATCH" --set train.seq_len=256 --set train.lr=1e-3 \
  --set train.min_lr_ratio=0.1 --set train.beta2=0.99 --set train.warmup_frac=0.02 \
  --set train.eval_every="$EVAL_EVERY" --set train.eval_batches="$EVAL_BATCHES" \
  --set train.compile="$COMPILE" --set train.save_every="$STEPS"
python benchmarks/run_summary.py "$OUT/run" --reach 1.47
