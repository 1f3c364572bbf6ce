#!/usr/bin/env bash
# The GPU check: one call of at most 6 minutes on an H100 or H200 whose python has torch, transformers,
# accelerate, safetensors and sentencepiece (no network, nothing else installed).
#
#   bash dev/bench/gpu_check.sh [python] [--dry-run]
#
# Every figure is printed when measured and added to $OUT/gpu_check.json (a temporary folder without
# $OUT), so a part cut short by its limit leaves everything it finished. Parts, in order:
# 1. 7B-shaped random weights built in GPU memory (no checkpoint written), bf16, 256 px geometry,
#    batch 1: eager and compiled ms/position, compile seconds, cudagraph_skips, peak VRAM, s/image;
#    then answer tokens/s at batch 1, eager and compiled (dev/bench/gpu_check.py).
# 2. The same images under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, ComfyUI's default: the pack
#    must choose inductor without CUDA graphs there, and that mode must run.
# 3. The backend tests with --device cuda (models on the GPU, every comparison on the CPU, TF32 off).
# 4. Only with time left: batch 4, then the 384 px geometry (729 positions, depth 16).
# --dry-run runs every part on the CPU with the golden-size preset and torch.cuda stubbed (tests/backend/
# test_gpu_check.py does, so that a Python error never spends device time).
set -u
cd "$(dirname "$0")/../.."
PY=python3 DRY=""
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY=--dry-run; else PY=$arg; fi
done
OUT="${OUT:-$(mktemp -d)}"
JSON="$OUT/gpu_check.json"
BUDGET=${GPU_CHECK_BUDGET:-345}  # seconds of the 6-minute call the parts may use, start-up included
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# a dry run checks the code, not the speed: on a loaded CPU (or with slow kernels) its parts get four times as long
SCALE=1; [ -n "$DRY" ] && SCALE=4 && BUDGET=$(( BUDGET * SCALE ))
part() {  # part SECONDS TITLE COMMAND...: runs for SECONDS at most, and never past the budget
  local limit=$(( $1 * SCALE )) title=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 20 ]; then echo "=== $title: skipped, $(left)s left"; return; fi
  echo; echo "=== $title (limit ${limit}s, at $(( $(date +%s) - start ))s)"
  timeout --signal=INT --kill-after=5 "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "=== $title: exit code $rc$( [ $rc -eq 124 ] && echo ' (time limit)')"
}
CHECK=("$PY" -m dev.bench.gpu_check images --json "$JSON" $DRY)
part 150 "7B bf16, 256 px, batch 1, native allocator; answers" "${CHECK[@]}" --label "native allocator" --answers
part 75 "7B bf16, 256 px, batch 1, cudaMallocAsync" \
  env PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync "${CHECK[@]}" --label cudaMallocAsync
if [ -n "$DRY" ]; then TESTS=(--device cpu tests/backend/test_compile_choice.py)
else TESTS=(--device cuda tests/backend); fi
part 90 "backend tests ${TESTS[*]}" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
"$PY" -m dev.bench.gpu_check record --json "$JSON" --label tests --name summary --value "$(tail -1 "$OUT/tests.log")"
part 80 "7B bf16, 256 px, batch 4 (time left)" "${CHECK[@]}" --label "batch 4" --batch 4
part 120 "7B bf16, 384 px, batch 1 (time left)" "${CHECK[@]}" --label "384 px" --geometry 384
echo; echo "=== done in $(( $(date +%s) - start ))s; figures in $JSON"
