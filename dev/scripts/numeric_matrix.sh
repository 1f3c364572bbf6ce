#!/usr/bin/env bash
# The numeric tests (every test not marked `comfyui`) under the kernels of other CPUs, seen from this one.
#
#   bash dev/scripts/numeric_matrix.sh [pytest args...]      e.g. -k depth, or tests/backend/test_depth.py
#
# PyTorch picks its CPU kernels at start-up from the CPU (ATEN_CPU_CAPABILITY caps the choice:
# default = no vector kernels, avx2, avx512), oneDNN its own (ONEDNN_MAX_CPU_ISA), and both sum in
# other orders with other thread counts. A test whose bound follows from the arithmetic
# (tests/conftest.py) passes in every cell; one whose bound was measured on one machine fails in some.
# Each cell runs with 1 and with 2 threads per process (in two pytest-xdist workers, a file each, to
# halve the wall time; VILAU_MATRIX_WORKERS=0 runs one process). Cells the CPU can't run (avx512
# without AVX-512) are reported as such, not run. Prints one line per cell and exits non-zero if any
# cell failed. Takes about six times the backend suite: half an hour on a 2-core machine.
# VILAU_MATRIX_CAPS="avx2 avx512" runs only those capabilities.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${VILAU_VENV:-.venv}/bin/python
LOG=${VILAU_MATRIX_LOG:-.cache/numeric-matrix}
mkdir -p "$LOG"
args=("$@")
workers=(-n "${VILAU_MATRIX_WORKERS:-2}" --dist loadfile)
[ "${VILAU_MATRIX_WORKERS:-2}" = 0 ] && workers=()
[ ${#args[@]} -eq 0 ] && args=(-m "not comfyui" tests)

has_avx512=$(grep -m1 -o -w avx512f /proc/cpuinfo || true)
# oneDNN's ISA names for the same three levels (its own dispatch is capped separately from ATen's)
declare -A onednn=([default]=SSE41 [avx2]=AVX2 [avx512]=AVX512_CORE_AMX)
failed=0
for cap in ${VILAU_MATRIX_CAPS:-default avx2 avx512}; do
    if [ "$cap" = avx512 ] && [ -z "$has_avx512" ]; then
        echo "numeric_matrix: $cap: not run (this CPU has no AVX-512)"
        continue
    fi
    for threads in 1 2; do
        cell="$cap-t$threads"
        start=$(date +%s)
        ATEN_CPU_CAPABILITY=$cap ONEDNN_MAX_CPU_ISA=${onednn[$cap]} OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
            "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" "${args[@]}" > "$LOG/$cell.log" 2>&1
        rc=$?
        summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|no tests ran" "$LOG/$cell.log" | tail -1 | tr -d '=')
        echo "numeric_matrix: $cell: exit $rc, $summary ($(( $(date +%s) - start )) s; log $LOG/$cell.log)"
        grep -E "^FAILED" "$LOG/$cell.log" | sed "s/^/    /"
        [ $rc -ne 0 ] && failed=1
    done
done
exit $failed
