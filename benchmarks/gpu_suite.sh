#!/usr/bin/env bash
# Every GPU check and figure the targets in benchmarks/RESULTS.md need, in one go, each
# part's output in $OUT (JSON where the tool writes it, a log otherwise). Run on a CUDA
# machine after the README's install:
#
#   bash benchmarks/gpu_suite.sh                    # all parts
#   PARTS="tests prefill decode" bash benchmarks/gpu_suite.sh
#
# Parts: tests (CUDA-only and slow tests), prefill (32k/100k targets), decode (HBM
# fraction, llama 1.2B shape), train (gpt2 124M @1024, andromeda @8192), efficiency
# (benchmarks/efficiency.py at dim 1024), shakespeare (the full baby-GPT run, ~minutes),
# fsdp (per-GPU memory and step time of DDP, FSDP and FSDP + CPU offload at 1, 2, 4, ... GPUs
# up to the machine's count, gpt2 124M @1024; then the largest preset each setup trains),
# serve (benchmarks/serve_load.py with the server on the GPU: 1-64 streaming clients, a
# 12 x 768 model, batch invariance checked under load), serve-compiled (the same with
# `serve --compile`: each decode shape captured before serving, CUDA graphs per view).
# A part that fails, or runs past PART_TIMEOUT seconds (default 540), is reported and the
# suite goes on to the next. On a machine lent for a limited time, name the parts that fit:
#   PARTS="prefill decode serve" PART_TIMEOUT=200 bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_suite}
PARTS=${PARTS:-"tests prefill decode train efficiency shakespeare fsdp serve serve-compiled"}
PART_TIMEOUT=${PART_TIMEOUT:-540}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true

failed=()
part() {  # part NAME COMMAND...: run one part, log to $OUT/NAME.log
  local name=$1; shift
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*" | tee -a "$OUT/suite.log"
  local start=$SECONDS
  if timeout --kill-after=20 "$PART_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s" | tee -a "$OUT/suite.log"
  else
    echo "   FAILED (rc $?) in $((SECONDS - start)) s; see $OUT/$name.log" | tee -a "$OUT/suite.log"
    failed+=("$name")
  fi
}

part tests python -m pytest -m "slow or not slow" -q -rs
part prefill andromeda bench prefill --preset andromeda --seq 2048,8192,32768,100000 --dtype bfloat16 --json
part decode andromeda bench decode --preset llama --batch 1,8,32 --prompt-len 16 --new-tokens 256 \
  --dtype bfloat16 --compile --json
part train bash -c 'andromeda bench train --preset gpt2 --seq 1024 --batch 16 --steps 20 --compile --json &&
  andromeda bench train --preset andromeda --seq 8192 --batch 4 --steps 10 --compile --json'
part efficiency python benchmarks/efficiency.py --device cuda --dim 1024 --depth 8 --seq-len 1024 \
  --batch-size 8 --expert-hidden 2048 --moe-tokens 65536 --compile --json "$OUT/efficiency.json"
part shakespeare env OUT="$OUT/shakespeare-char" bash benchmarks/shakespeare_char.sh
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
WORLDS=1; for w in 2 4 8 16; do [ "$w" -le "$NGPU" ] && WORLDS="$WORLDS,$w"; done
part fsdp bash -c "python benchmarks/fsdp.py --device cuda --worlds $WORLDS --preset gpt2 --seq 1024 --batch 8 \
  --steps 10 --json && python benchmarks/fsdp.py --device cuda --worlds $WORLDS --seq 2048 --batch 1 --steps 1 \
  --probe gpt2,andromeda-1b,llama,andromeda-3b,andromeda-7b,andromeda-10b,andromeda-15b --json"
part serve python benchmarks/serve_load.py --clients 1,4,16,64 --max-batch 64 --dim 768 --depth 12 --heads 12 \
  --hidden 2048 --server-args="--device cuda" --baseline-args="--device cuda --no-batch-invariance" --json
part serve-compiled python benchmarks/serve_load.py --clients 1,16,64 --max-batch 64 --dim 768 --depth 12 \
  --heads 12 --hidden 2048 --server-args="--device cuda --compile" --skip-baselines --start-timeout 400 --json

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed parts: ${failed[*]}" | tee -a "$OUT/suite.log"
  exit 1
fi
echo "all parts passed; outputs in $OUT" | tee -a "$OUT/suite.log"
