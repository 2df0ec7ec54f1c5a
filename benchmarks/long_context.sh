#!/usr/bin/env bash
# Context extension on Tiny Shakespeare (character level): small models trained at 256 tokens,
# scored at 256..4096 tokens on the same held-out targets (`andromeda eval --lengths`).
#
#   bash benchmarks/long_context.sh [TEXT_FILE]
#   python benchmarks/long_context_plot.py runs/long-context   (table + benchmarks/long_context.png)
#
# Curves: RoPE as trained; RoPE with linear / NTK / YaRN scaling (factor 16, no training);
# RoPE fine-tuned at 1024 with each scaling (factor 4); ALiBi on every head (no rotary); ALiBi
# on half the heads + xPos on all, as the spec's andromeda preset configures positions.
set -euo pipefail
TEXT=${1:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-runs/long-context}
STEPS=${STEPS:-250}        # base training at 256 tokens, 16 sequences per step
FT_STEPS=${FT_STEPS:-60}   # fine-tune at 1024 tokens, 4 sequences per step (same tokens per step)
LENGTHS=${LENGTHS:-256,512,1024,2048,4096}
MODEL=(--set vocab_size=66 --set max_seq_len=256 --set dim=128 --set depth=4 --set attention.heads=4 --set attention.kv_heads=4
       --set mlp.dropout=0.0 --set embed_dropout=0.0)
TRAIN=(--set train.lr=2e-3 --set train.min_lr_ratio=0.1 --set train.beta2=0.99 --set train.warmup_frac=0.05
       --set train.eval_every=100000 --set train.eval_batches=1 --set train.compile=false --no-progress)
mkdir -p "$OUT"
[ -d "$OUT/data" ] || andromeda prepare --data "$TEXT" --tokenizer char --val-fraction 0.1 --out "$OUT/data"
# Held-out text: the last 6,144 characters (inside the validation tenth): 2,048 targets after
# the longest context.
python - "$TEXT" "$OUT/val.txt" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
open(sys.argv[2], "w", encoding="utf-8").write(text[-6144:])
PY

base() {  # name, position settings...
  local name=$1; shift
  [ -d "$OUT/$name/checkpoints" ] || andromeda train --preset shakespeare-char --data "$OUT/data" --out "$OUT/$name" \
      --max-steps "$STEPS" "${MODEL[@]}" "${TRAIN[@]}" --set train.batch_size=16 --set train.seq_len=256 \
      --set train.save_every="$STEPS" "$@"
}
base rope --set position.kind=rope
base alibi --set position.kind=none --set position.alibi_heads=-1
base alibi-xpos --set position.kind=xpos --set position.alibi_heads=2

# Same weights, scaling set in config.json, no training (factor 16: 256 -> 4096).
for s in linear ntk yarn; do
  d="$OUT/rope-$s-zero"
  if [ ! -d "$d" ]; then
    cp -r "$OUT/rope/checkpoints/latest/." "$d.tmp" 2>/dev/null || cp -rL "$OUT/rope/checkpoints/latest" "$d.tmp"
    python - "$d.tmp/config.json" "$s" <<'PY'
import json, sys
path, scaling = sys.argv[1], sys.argv[2]
cfg = json.load(open(path))
pos = cfg["model"].setdefault("position", {})
pos.update(rope_scaling=scaling, rope_factor=16.0, original_max_seq_len=256)
cfg["model"]["max_seq_len"] = 4096
json.dump(cfg, open(path, "w"), indent=1)
PY
    mv "$d.tmp" "$d"
  fi
done

# Fine-tune at 1024 with each scaling (factor 4).
for s in linear ntk yarn; do
  [ -d "$OUT/rope-$s-ft/checkpoints" ] || andromeda train --init "$OUT/rope/checkpoints/latest" --data "$OUT/data" \
      --out "$OUT/rope-$s-ft" --max-steps "$FT_STEPS" "${MODEL[@]}" "${TRAIN[@]}" --set max_seq_len=1024 \
      --set position.rope_scaling=$s --set position.rope_factor=4 --set position.original_max_seq_len=256 \
      --set train.lr=5e-4 --set train.batch_size=4 --set train.seq_len=1024 --set train.save_every="$FT_STEPS"
done

ev() {  # name, checkpoint, extra flags
  local name=$1 ckpt=$2; shift 2
  [ -f "$OUT/eval-$name.json" ] || andromeda eval --ckpt "$ckpt" --data "$OUT/val.txt" --lengths "$LENGTHS" \
      --device cpu --json "$@" > "$OUT/eval-$name.json.tmp" && mv "$OUT/eval-$name.json.tmp" "$OUT/eval-$name.json"
}
ev rope "$OUT/rope/checkpoints/latest" --allow-extrapolation
for s in linear ntk yarn; do ev "rope-$s-zero" "$OUT/rope-$s-zero"; done
for s in linear ntk yarn; do ev "rope-$s-ft" "$OUT/rope-$s-ft/checkpoints/latest"; done
ev alibi "$OUT/alibi/checkpoints/latest"
ev alibi-xpos "$OUT/alibi-xpos/checkpoints/latest" --allow-extrapolation
echo "$OUT"
