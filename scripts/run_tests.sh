#!/usr/bin/env bash
# Set up a test environment from nothing and run the whole test suite.
#
#   bash scripts/run_tests.sh [pytest args...]
#
# Creates .venv (torch 2.14.1 + torchvision 0.29.1, the pack's requirements and
# the test tools) and a pinned ComfyUI 0.3.75 in .cache/comfyui for the
# end-to-end tests, then runs pytest. Re-running reuses both.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VILAU_VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip
# torch is the user's own in ComfyUI; for the tests we pin the pair that runs here
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -r requirements.txt "pytest>=8" "requests>=2.31" "av>=12" "pillow>=10" "numpy>=1.24"
if [ -f .ci/install_comfyui.sh ]; then
    bash .ci/install_comfyui.sh .cache/comfyui "$VENV"
fi
exec "$PY" -m pytest "$@"
