"""requirements.txt and pyproject.toml: installing the pack into an existing ComfyUI leaves torch alone and never
downgrades transformers.

The installs are real `pip install -r requirements.txt` runs, each in a
throwaway virtualenv layered over this test environment (the ComfyUI one:
torch, torchvision and ComfyUI's requirements, seen through a .pth file, as an
existing ComfyUI install). One layer keeps this environment's transformers
(the current 5.x), the other first installs transformers 4.50.3, ComfyUI's own
floor. torch, torchvision and transformers must be the same before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

pytestmark = pytest.mark.comfyui  # installs into a ComfyUI-like environment: not part of the transformers 4.50.3 pass

REQUIREMENTS = REPO / "requirements.txt"
TRANSFORMERS_FLOOR = "4.50.3"
WATCHED = ("torch", "torchvision", "transformers")


def requirements() -> list[Requirement]:
    lines = REQUIREMENTS.read_text(encoding="utf-8").splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


# ---- what the files say -----------------------------------------------------------------


def test_requirements_never_name_torch():
    named = {r.name.lower() for r in requirements()}
    assert not named & {"torch", "torchvision", "torchaudio"}, named


def test_requirements_accept_transformers_from_comfyui_floor_to_current_5x():
    (transformers,) = [r for r in requirements() if r.name == "transformers"]
    for version in (TRANSFORMERS_FLOOR, "4.57.1", "5.0.0", "5.24.0"):
        assert transformers.specifier.contains(version), f"{transformers} rejects {version}"
    assert not transformers.specifier.contains("4.50.2"), f"{transformers} accepts versions below ComfyUI's floor"


def test_pyproject_dependencies_are_the_requirements():
    declared = sorted(str(Requirement(d)) for d in pyproject()["project"]["dependencies"])
    assert declared == sorted(str(r) for r in requirements())


def test_pyproject_has_registry_metadata():
    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] == "comfyui-vila-u" and Version(project["version"])
    assert project["description"] and project["license"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), f"[tool.comfy] {key} is empty"
    assert comfy["requires-comfyui"].startswith(">=0.3.75")
    assert comfy["Icon"].startswith("https://"), "the registry shows Icon from a URL"
    assert "web" not in comfy, "[tool.comfy] web would load web/js a second time (WEB_DIRECTORY already does)"


# ---- installing into a ComfyUI environment ---------------------------------------------


def layered_venv(folder: Path) -> Path:
    """A virtualenv that sees this test environment's packages after its own (a .pth file); returns its python."""
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    base = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_comfyui_environment.pth").write_text("\n".join(sorted(base)) + "\n", encoding="utf-8")
    return python


def versions(python: Path) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json; "
        f"print(json.dumps({{n: m.version(n) for n in {list(WATCHED)!r}}}))"
    )
    return json.loads(subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout)


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def comfyui_environment_ready():
    missing = [name for name in WATCHED if not _installed(name)]
    if missing:
        pytest.fail(f"the test environment lacks {missing}: run bash dev/scripts/run_tests.sh", pytrace=False)


def _installed(name: str) -> bool:
    import importlib.metadata as m

    try:
        m.version(name)
        return True
    except m.PackageNotFoundError:
        return False


@pytest.mark.parametrize("transformers", ["current", TRANSFORMERS_FLOOR])
def test_installing_requirements_keeps_torch_and_transformers(tmp_path, comfyui_environment_ready, transformers):
    python = layered_venv(tmp_path / "env")
    if transformers != "current":  # an existing ComfyUI at transformers' floor
        pip(python, "install", "--quiet", f"transformers=={transformers}")
    before = versions(python)
    if transformers != "current":
        assert before["transformers"] == transformers

    pip(python, "install", "--quiet", "-r", str(REQUIREMENTS))

    after = versions(python)
    assert after == before, f"pip install -r requirements.txt changed {before} to {after}"


def test_dry_run_in_the_test_environment_installs_nothing_for_torch_or_transformers(tmp_path):
    report = tmp_path / "report.json"
    pip(Path(sys.executable), "install", "--quiet", "--dry-run", "--report", str(report), "-r", str(REQUIREMENTS))
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text(encoding="utf-8"))["install"]}
    assert not set(planned) & set(WATCHED), f"pip would install {planned}"
