#!/usr/bin/env bash
# Set up a test environment from nothing and run the whole test suite.
#
#   bash dev/scripts/run_tests.sh [pytest args...]
#
# 1. .venv: torch 2.14.1 + torchvision 0.29.1, the pack's requirements, the test
#    tools (pytest, playwright's Python package: it drives Debian's Chromium and
#    never downloads a browser), and a pinned ComfyUI 0.3.75 in .cache/comfyui for
#    the end-to-end and browser tests; the newest front end (comfyui-frontend-package, its
#    static folder in .cache/frontend/<version>) for the browser tests, which run against both;
#    comfy-cli and comfyui-manager in .cache/venv-ecosystem (tests/comfyui/test_ecosystem_clients.py).
# 2. Chromium for the browser tests: Debian's chromium + chromium-driver, installed
#    with apt-get when this runs as root and they are missing (otherwise the browser
#    tests fail, saying what to install).
# 3. pytest over tests/ (the whole suite, or what the arguments say): the tests that start no ComfyUI in two
#    worker processes (pytest-xdist), then the ComfyUI and browser tests (marked `comfyui`) in one.
# 4. The backend tests again under transformers 4.50.3, ComfyUI's floor: .cache/venv-transformers-4.50.3
#    layers transformers 4.50.3 over .venv's packages (same torch, no second copy). "Backend" is every
#    test not marked `comfyui` or `no_transformers` (tests/conftest.py), so a new backend test file joins
#    this pass unlisted unless it says it runs none of transformers' code.
#    VILAU_TF450=0 skips this pass.
#
# Re-running reuses everything. The exit code is pytest's (the first failing pass's).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VILAU_VENV:-.venv}
VENV450=${VILAU_VENV450:-.cache/venv-transformers-4.50.3}
PY="$VENV/bin/python"
start=$(date +%s)

# ---- 1. the test environment ------------------------------------------------------------
bash dev/scripts/setup_env.sh "torchao>=0.18.0" "bitsandbytes>=0.49" "pytest>=8" "pytest-xdist>=3.5" "requests>=2.31" "av>=12" "pillow>=10" "numpy>=1.24" "playwright>=1.40"

# ---- 1b. the newest front end, served by the pinned backend in the browser tests -------------
# (dev/comfy_harness/browser.py NEWEST_FRONT_END; the pinned ComfyUI's own front end is 1.32.9)
FRONT_END=${VILAU_NEWEST_FRONT_END:-1.58.1}
FRONT_END_DIR=.cache/frontend/$FRONT_END
if [ ! -f "$FRONT_END_DIR/static/index.html" ]; then
    echo "run_tests: downloading comfyui-frontend-package==$FRONT_END"
    work=$(mktemp -d)
    "$PY" -m pip download --quiet --no-deps --dest "$work" "comfyui-frontend-package==$FRONT_END"
    "$PY" - "$work"/comfyui_frontend_package-*.whl "$FRONT_END_DIR" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path
wheel, dest = sys.argv[1], Path(sys.argv[2])
prefix = "comfyui_frontend_package/static/"
stage = dest.with_name(dest.name + ".partial")  # moved into place only when complete
shutil.rmtree(stage, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
    for name in members:
        target = stage / "static" / name[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(zf.read(name))
if not (stage / "static" / "index.html").is_file():
    sys.exit(f"run_tests: no {prefix}index.html in {wheel}")
shutil.rmtree(dest, ignore_errors=True)
stage.rename(dest)
print(f"run_tests: front end extracted into {dest} ({len(members)} files)")
EOF
    rm -rf "$work"
fi
export VILAU_NEWEST_FRONT_END=$FRONT_END

# ---- 1c. the ecosystem's clients: comfy-cli (the registry's checks) and ComfyUI-Manager's CLI ---------
# in a venv of their own, so that their dependencies never change .venv; .venv's packages come after
# the venv's own (as for the 4.50.3 pass), so that the manager's install step, run with this venv's
# python, finds the pack's requirements installed as in a ComfyUI environment, and runs offline
ECOSYSTEM=${VILAU_ECOSYSTEM_VENV:-.cache/venv-ecosystem}
if [ ! -x "$ECOSYSTEM/bin/python" ]; then
    python3 -m venv "$ECOSYSTEM"
fi
purelib_eco=$("$ECOSYSTEM/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$purelib_eco/_vilau_test_env.pth"
# the venv's own setuptools would shadow .venv's, older than torch's requirement (>=77.0.3)
"$ECOSYSTEM/bin/python" -m pip install --quiet --upgrade pip setuptools
"$ECOSYSTEM/bin/python" -m pip install --quiet "comfy-cli==1.23.0" "comfyui-manager==4.3"
export VILAU_ECOSYSTEM_VENV=$ECOSYSTEM

# ---- 2. Chromium ------------------------------------------------------------------------
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run_tests: installing Debian's chromium and chromium-driver for the browser tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "run_tests: no /usr/bin/chromium (apt-get install chromium chromium-driver): the browser tests will fail"
    fi
fi
echo "run_tests: environment ready ($(( $(date +%s) - start )) s)"

# ---- 3. the suite -----------------------------------------------------------------------
rc=0
if [ $# -gt 0 ]; then
    "$PY" -m pytest "$@" || rc=$?
else
    # the tests that run no ComfyUI in two worker processes of one thread each: the small models' kernels
    # are too small for a second thread to help, a second process halves the wall time; then the
    # ComfyUI and browser tests one after another (each starts servers and a browser of its own)
    OMP_NUM_THREADS=1 "$PY" -m pytest -n 2 --dist loadfile -m "not comfyui" tests || rc=$?
    rc_comfyui=0
    "$PY" -m pytest -m comfyui tests || rc_comfyui=$?
    if [ "$rc" = 0 ]; then rc=$rc_comfyui; fi
fi

# ---- 4. the backend under transformers 4.50.3 -------------------------------------------
if [ "${VILAU_TF450:-1}" != 0 ]; then
    PY450="$VENV450/bin/python"
    if [ ! -x "$PY450" ]; then
        python3 -m venv "$VENV450"
    fi
    # .venv's packages (torch, pytest, ...) come after its own, which hold transformers 4.50.3
    purelib450=$("$PY450" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$purelib450/_vilau_test_env.pth"
    "$PY450" -m pip install --quiet "transformers==4.50.3"
    "$PY450" -c "import transformers, torch; print(f'run_tests: backend tests under transformers {transformers.__version__}, torch {torch.__version__}')"
    rc450=0
    OMP_NUM_THREADS=1 "$PY450" -m pytest -q -n 2 --dist loadfile -m "not comfyui and not no_transformers" tests || rc450=$?
    if [ "$rc" = 0 ]; then rc=$rc450; fi
fi
echo "run_tests: done in $(( $(date +%s) - start )) s (exit $rc)"
exit "$rc"
