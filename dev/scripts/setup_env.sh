#!/usr/bin/env bash
# Create (or update) the virtualenv that runs the pinned ComfyUI with this pack.
#
#   bash dev/scripts/setup_env.sh [extra pip requirements...]
#
# .venv (or $VILAU_VENV): torch 2.14.1 + torchvision 0.29.1 (the pair that installs on
# these machines; in your own ComfyUI keep your torch), the pack's requirements.txt,
# any extra requirements given, and ComfyUI 0.3.75 in .cache/comfyui with its
# requirements (.ci/install_comfyui.sh). Used by dev/scripts/demo.sh and dev/scripts/run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VILAU_VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -r requirements.txt "$@"
bash .ci/install_comfyui.sh .cache/comfyui "$VENV"
