#!/usr/bin/env bash
# GPU check of the compiled steps and the quantized weights, in at most 8 minutes, on a machine with a CUDA GPU whose
# python has torch, transformers, accelerate, safetensors and sentencepiece (no package registry needed).
#
#   bash dev/bench/gpu_check.sh [python]        (default: python3)
#
# 1. Full-size random weights (LLaMA-2-7B + SigLIP + depth transformer, bf16) built in GPU memory, no
#    files: text to image at the 256 px model's geometry (16x16 grid, depth 4) and the 384 px model's
#    (27x27 grid, depth 16), batch 1 and 4, eager and compiled (CUDA graphs): ms per position, s per
#    image, peak VRAM, compile time, compiled/eager ratio. Eager runs at 384 px are timed over their
#    first 96 positions and extrapolated, to stay inside the time budget.
#    Then B answers of 32 tokens after a one-image prompt: ms per answer token, eager and compiled.
# 2. The backend tests on CUDA (pytest --device cuda): the golden parity tests with the fixtures' models
#    on the GPU, and tests/backend/test_compiled_step.py (compiled against eager) there.
#    CUDA parity tolerances: discrete results (codes, token ids) must be identical, because every run
#    checked is clear of near-ties by more than kernel rounding (fp32 logits differ between cuBLAS/Triton
#    and the CPU by ~1e-6 relative; TF32 stays off, torch's default for matmuls); tensors compared with
#    a tolerance keep the CPU tests' tolerance (rtol 1e-5 / atol 1e-5 in fp32, one bf16 ulp in bf16).
# 3. VRAM after loading and peak VRAM while generating, for quantize int8 and none, from a 7B-shaped
#    checkpoint on disk (dev/bench/gpu_memory.py; 4bit needs bitsandbytes, which the reference machine lacks).
# Each part has its own time limit; a part that overruns is reported and the next one starts.
set -u
cd "$(dirname "$0")/../.."
PY="${1:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
part() {  # part SECONDS TITLE COMMAND...
  local limit=$1 title=$2; shift 2
  echo; echo "=== $title (limit ${limit}s, at $(( $(date +%s) - start ))s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "=== $title: exit code $rc$( [ $rc -eq 124 ] && echo ' (time limit)')"
}
"$PY" - <<'PYEOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
assert torch.cuda.is_available(), "no CUDA GPU visible to this python"
PYEOF
[ $? -eq 0 ] || exit 1
part 130 "7B bf16, 256 px geometry (256 positions, depth 4), then answers of 32 tokens" \
  "$PY" dev/bench/generate.py --preset full --geometry 256 --batch 1 4 --compile --dtype bfloat16 --device cuda \
  --answer-tokens 32
part 150 "7B bf16, 384 px geometry (729 positions, depth 16)" \
  "$PY" dev/bench/generate.py --preset full --geometry 384 --batch 1 4 --compile --dtype bfloat16 --device cuda \
  --eager-positions 96 --answer-tokens 0
part 90 "backend tests on CUDA" \
  "$PY" -m pytest -q -p no:cacheprovider --device cuda tests/backend/test_compiled_step.py tests/backend/test_compiled_answers.py \
  tests/backend/test_generate.py tests/backend/test_depth.py tests/backend/test_vision_parity.py
part 100 "VRAM of each quantize choice at 7B (writes a 15 GB random checkpoint first)" \
  "$PY" dev/bench/gpu_memory.py --quantize int8 none --device cuda
echo; echo "=== done in $(( $(date +%s) - start ))s"
