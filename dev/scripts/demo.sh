#!/usr/bin/env bash
# One command from a fresh clone: set up a pinned ComfyUI 0.3.75 with this pack and run
# the text-to-image and image Q&A templates headless, end to end.
#
#   bash dev/scripts/demo.sh [--models DIR]
#
# Installs .venv and .cache/comfyui (dev/scripts/setup_env.sh; a second run reuses them),
# then dev/scripts/demo.py: starts ComfyUI on 127.0.0.1, queues example_workflows/VILA-U 06 Text to Image, Upscaled.json
# and example_workflows/VILA-U 01 Image Q&A.json, prints the files written and the answer, and says
# which model it used: a published one if models/vila-u/vila-u-7b-256 (or -384) is there
# (or in --models DIR), else a small random demo model. Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash dev/scripts/setup_env.sh
exec "${VILAU_VENV:-.venv}/bin/python" -m dev.scripts.demo "$@"
