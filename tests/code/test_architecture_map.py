"""docs/ARCHITECTURE.md names real places: every repository path in it (backticked, or drawn in its
tree) exists, and every name given after one (`nodes/progress.py: PositionProgress`) is defined in
that file, so the map cannot go stale when a module moves, is renamed or loses a function."""

from __future__ import annotations

import re

from conftest import REPO

MAP = REPO / "docs" / "ARCHITECTURE.md"
BACKEND = REPO / "vilau_backend"

# backticked things that look like paths but are not the repository's: ComfyUI's folders and files,
# and what a dataset job writes
NOT_IN_REPO = {"models/vila-u/<name>/", "models/vila-u/.cache/quantized/", "extra_model_paths.yaml", "summary.json"}

PATH = re.compile(r"^[\w.][\w./-]*(/|\.(py|js|md|sh|txt|toml|json|yaml))$")
SECTION_FOLDERS = {"The nodes": REPO / "nodes"}  # the nodes table names its modules without the folder


def places(text: str):
    """(line number, path, names after it, folders of the paths before it in its paragraph, section)
    for each path the map names."""
    section, folders = "", []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.strip() or re.match(r"\s*(#|\||\d+\. |- )", line):  # a new paragraph, row or item
            folders = []
        drawn = section == "The tree" and line.startswith("    ")  # the tree's drawing: paths, then what they hold
        tokens = line.strip().split("  ")[0].split(", ") if drawn else re.findall(r"`([^`]+)`", line)
        for token in tokens:
            path, _, names = token.partition(": ")
            path = path.removesuffix("()")
            if not (drawn or PATH.match(path)) or path in NOT_IN_REPO:
                continue
            yield number, path, names, list(folders), section
            folder = path if path.endswith("/") else path.rpartition("/")[0] + "/"
            if folder != "/":
                folders.append(folder)


def resolve(path: str, folders: list[str], section: str):
    """The file or folder `path` names (None if none): from the repository's root or the backend's (layer paths like
    `decoding/prompts.py`); a bare file name also from the folder of a path named before it in its
    paragraph (`decoding/text_step.py` ... `answer_loop.py`), or from its section's folder."""
    roots = [REPO, BACKEND]
    if "/" not in path.rstrip("/"):
        for folder in folders:
            roots += [REPO / folder, BACKEND / folder]
        roots += [SECTION_FOLDERS[section]] if section in SECTION_FOLDERS else []
    return next((root / path for root in roots if (root / path).exists()), None)


def defines(source: str, name: str) -> bool:
    return all(re.search(rf"^\s*(async\s+def|def|class)\s+{re.escape(part)}\b|^{re.escape(part)}\s*[:=]", source, re.M)
               for part in name.split("."))


def test_the_reader_finds_paths_and_the_names_after_them():
    found = list(places("## The nodes\n| `loader.py`, `x/` | see `nodes/progress.py: PositionProgress`, "
                        "`comfy.utils.ProgressBar`, `summary.json` |\n1. **Step** (`decoding/text_step.py`)\n"
                        "   then `answer_loop.py: AnswerSteps`\n2. `prompts.py`"))
    assert [(p, n, f) for _, p, n, f, _ in found] == [
        ("loader.py", "", []), ("x/", "", []), ("nodes/progress.py", "PositionProgress", ["x/"]),
        ("decoding/text_step.py", "", []), ("answer_loop.py", "AnswerSteps", ["decoding/"]), ("prompts.py", "", []),
    ]
    assert resolve("loader.py", [], "The nodes") == REPO / "nodes" / "loader.py"
    assert resolve("config.py", ["checkpoint/"], "") == BACKEND / "checkpoint" / "config.py"
    assert resolve("config.py", [], "") is None
    assert defines("class A:\n    def b(self):\n", "A.b") and not defines("a_b = 1\n", "b")


def test_every_path_the_map_names_exists():
    missing = [f"line {number}: {path}" for number, path, _, folders, section in places(MAP.read_text("utf-8"))
               if resolve(path, folders, section) is None]
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_name_the_map_gives_after_a_path_is_defined_there():
    undefined = []
    for number, path, names, folders, section in places(MAP.read_text("utf-8")):
        target = resolve(path, folders, section)
        for name in filter(None, (n.strip().removesuffix("()") for n in names.split(","))):
            if target is not None and target.is_file() and not defines(target.read_text("utf-8"), name):
                undefined.append(f"line {number}: {path}: {name}")
    assert not undefined, f"docs/ARCHITECTURE.md names what these files do not define: {undefined}"


def test_every_module_of_the_backend_and_the_nodes_has_its_place_in_the_map():
    named = {resolve(path, folders, section) for _, path, _, folders, section in places(MAP.read_text("utf-8"))}
    modules = [*BACKEND.rglob("*.py"), *(REPO / "nodes").glob("*.py")]
    unnamed = sorted(str(m.relative_to(REPO)) for m in modules
                     if m not in named and not (m.name == "__init__.py" and m.parent in named))
    assert not unnamed, f"say in docs/ARCHITECTURE.md what these modules hold: {unnamed}"
