"""The ecosystem's own clients on this pack, offline: the registry's checks (comfy-cli's
`comfy node validate`, what `comfy node publish` runs first) and an install with
ComfyUI-Manager's CLI (`cm-cli install`, package comfyui-manager) into a fresh ComfyUI.

Both run from .cache/venv-ecosystem (dev/scripts/run_tests.sh installs comfy-cli 1.23.0 and
comfyui-manager 4.3 there, over .venv's packages, so the manager's pip step finds the pack's
requirements installed as in a ComfyUI environment), on a clean git clone of this checkout:
what the registry and the manager see is what git tracks (commit first to test local changes).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

# run_tests.sh exports a path relative to the repository; the tools run with other working folders
ECOSYSTEM = cs.REPO_ROOT / os.environ.get("VILAU_ECOSYSTEM_VENV", ".cache/venv-ecosystem")
SMALL = "vila-u-small"


@pytest.fixture(scope="module")
def ecosystem() -> Path:
    for tool in ("comfy", "cm-cli"):
        if not (ECOSYSTEM / "bin" / tool).is_file():
            pytest.fail(
                f"no {tool} in {ECOSYSTEM}: dev/scripts/run_tests.sh installs comfy-cli and comfyui-manager there",
                pytrace=False,
            )
    return ECOSYSTEM


def run(cmd: list, cwd: Path, timeout: float, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", "DO_NOT_TRACK": "1", **env}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def git(*args, cwd: Path = cs.REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_registry_validation_passes(ecosystem, tmp_path):
    clone = tmp_path / cs.PACK
    git("clone", "--quiet", str(cs.REPO_ROOT), str(clone))
    result = run([ecosystem / "bin" / "comfy", "--skip-prompt", "node", "validate"], cwd=clone, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # pyproject.toml's [project] and [tool.comfy] were read, and the security rules (exec, eval,
    # several statements on one line: errors soon, warnings today) found nothing
    assert "Validating node configuration" in output and "Security warnings" not in output, output
    assert "All validation checks passed successfully" in output, output


def serve_folder(folder: Path) -> ThreadingHTTPServer:
    """A plain HTTP server on 127.0.0.1 for folder (git clones over its "dumb" HTTP protocol)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def fresh_comfyui(dest: Path) -> Path:
    """A copy of the pinned ComfyUI without custom nodes, models or user files."""
    source = cs.comfyui_dir()
    skipped_at_top = {"custom_nodes", "models", "input", "output", "user", "temp"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == source  # comfy/ldm/models is code, not a model folder
        return {n for n in names if n == "__pycache__" or (top and n in skipped_at_top)}

    shutil.copytree(source, dest, ignore=ignore)
    (dest / "custom_nodes").mkdir()
    return dest


def test_manager_installs_the_pack_into_a_fresh_comfyui(ecosystem, tmp_path):
    comfy = fresh_comfyui(tmp_path / "ComfyUI")
    served = tmp_path / "served"
    bare = served / f"{cs.PACK}.git"
    git("clone", "--quiet", "--bare", str(cs.REPO_ROOT), str(bare))
    git("update-server-info", cwd=bare)
    http = serve_folder(served)
    try:
        url = f"http://127.0.0.1:{http.server_port}/{cs.PACK}.git"
        # PIP_NO_INDEX: the manager's pip step must find every requirement installed (offline)
        result = run([ecosystem / "bin" / "cm-cli", "install", url], cwd=comfy, timeout=600,
                     COMFYUI_PATH=str(comfy), PIP_NO_INDEX="1")
    finally:
        http.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"[INSTALLED] {url}" in output and "An error occurred while installing" not in output, output

    installed = comfy / "custom_nodes" / cs.PACK
    assert git("rev-parse", "HEAD", cwd=installed) == git("rev-parse", "HEAD")
    assert (installed / "web" / "js" / "vilau.js").is_file() and (installed / "example_workflows").is_dir()

    loads_and_runs(comfy, installed, tmp_path / "run")


def loads_and_runs(comfy: Path, pack: Path, run_dir: Path) -> None:
    """The pack at `pack` loads in that ComfyUI and works: encode and decode an image with a small random model."""
    from vilau_backend.testing.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(run_dir / "models" / "vila-u" / SMALL)
    server = cs.ComfyServer(comfy, run_dir, {cs.PACK: pack}, env={"OMP_NUM_THREADS": "1"})
    server.start(timeout=180)
    try:
        assert not server.import_failed(cs.PACK), server.log_tail()
        assert f"/extensions/{cs.PACK}/vilau.js" in server.get("/extensions").json()
        graph = {
            "1": wa.loader_node(SMALL),
            "2": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1, "color": 0}},
            "3": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
            "4": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["3", 0]}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "installed"}},
        }
        entry = server.run(graph, timeout=120)
        [image] = server.output_files(entry, "5")
        assert image.is_file() and image.stat().st_size > 0
    finally:
        server.stop()


# what the registry package must hold: the code and files the nodes read at run time
SHIPPED_FOLDERS = (
    "nodes/", "vilau_backend/", "web/", "example_workflows/", "example_inputs/", "docs/",  # docs: README's pictures
)
SHIPPED_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md")
# what it must not: tests and their fixtures, benchmarks, the ComfyUI test harness, scripts, CI
DEV_FOLDERS = ("tests/", ".ci/", "bench/", "comfy_harness/", "scripts/", "dev/")


def test_registry_package_holds_what_the_nodes_need_and_no_dev_folders(ecosystem, tmp_path):
    clone = tmp_path / "clone"
    git("clone", "--quiet", str(cs.REPO_ROOT), str(clone))
    result = run([ecosystem / "bin" / "comfy", "--skip-prompt", "node", "pack"], cwd=clone, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(clone / "node.zip") as package:
        packed = set(package.namelist())
        unpacked = tmp_path / "unpacked" / cs.PACK
        package.extractall(unpacked)

    tracked = set(git("ls-files", cwd=clone).splitlines())
    needed = {f for f in tracked if f.startswith(SHIPPED_FOLDERS) or f in SHIPPED_FILES}
    assert {"nodes/__init__.py", "vilau_backend/model/vila_u.py", "web/js/vilau.js"} <= needed
    assert sorted(needed - packed) == []
    assert sorted(f for f in packed if f.startswith(DEV_FOLDERS)) == []
    assert sorted(packed - needed) == [], "files packed that no shipped folder lists: ship them or ignore them"

    # the unpacked package alone (no tests, harness or scripts beside it) loads and runs in ComfyUI
    loads_and_runs(fresh_comfyui(tmp_path / "ComfyUI"), unpacked, tmp_path / "run")
