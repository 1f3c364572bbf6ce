"""Where VILA-U models live: the `vila_u` model folder, its listing, and downloads from the hub.

Models are folders in the published layout under `ComfyUI/models/vila-u/` or any
path given under the `vila_u` key of extra_model_paths.yaml. The loader's combo
lists those folders by their path relative to the root they were found in, and
always lists the published repositories too: choosing one uses its folder
`models/vila-u/<repo name>` when it is complete, and downloads it there
otherwise (resuming an interrupted download).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..vilau_backend.checkpoint.config import is_vila_u_folder
from ..vilau_backend.checkpoint.hub import Progress, download_published, is_complete_download
from ..vilau_backend.checkpoint.published import FILES_HINT, PUBLISHED
from ..vilau_backend.errors import CheckpointError

FOLDER_NAME = "vila_u"  # folder_paths key, and the key in extra_model_paths.yaml
DEFAULT_SUBDIR = "vila-u"  # under ComfyUI/models


def register_folder() -> None:
    """Add models/vila-u to the `vila_u` model folder, after any paths extra_model_paths.yaml gave it."""
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, DEFAULT_SUBDIR))


def model_roots() -> list[Path]:
    import folder_paths

    try:
        return [Path(p) for p in folder_paths.get_folder_paths(FOLDER_NAME)]
    except KeyError:  # the pack's __init__ registers it; only missing if that did not run
        return [Path(folder_paths.models_dir) / DEFAULT_SUBDIR]


def default_root() -> Path:
    import folder_paths

    return Path(folder_paths.models_dir) / DEFAULT_SUBDIR


def quantized_cache_folder() -> Path:
    """Where quantized weights are kept for the next load: models/vila-u/.cache/quantized (hidden, so that
    the model list skips it; beside the models, since a 7B copy is several GB)."""
    return default_root() / ".cache" / "quantized"


def local_models() -> dict[str, Path]:
    """{name: folder} of the VILA-U models found, first root wins. A name is the folder's path
    relative to its root ('vila-u-7b-256', 'mine/finetune'); models are looked for two levels deep."""
    found: dict[str, Path] = {}
    for root in model_roots():
        if is_vila_u_folder(root):  # the yaml named a model folder itself
            found.setdefault(root.name, root)
            continue
        for child in _subfolders(root):
            if is_vila_u_folder(child):
                found.setdefault(child.name, child)
                continue
            for grandchild in _subfolders(child):
                if is_vila_u_folder(grandchild):
                    found.setdefault(f"{child.name}/{grandchild.name}", grandchild)
    return found


def model_choices() -> list[str]:
    """The loader's combo: local model folders, then the published repositories."""
    names = sorted(local_models(), key=str.lower)
    return names + [repo for repo in PUBLISHED if repo not in names]


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    except OSError:
        return []


# ---- resolving a choice to a folder -------------------------------------------------------

def resolve_model(name: str, download: bool, progress: Progress | None = None) -> Path:
    """The folder of the model chosen in the loader, downloading a published one when allowed."""
    local = local_models()
    if name in local and name not in PUBLISHED:
        return local[name]
    if name not in PUBLISHED:
        raise CheckpointError(unknown_model(name))
    folder = published_folder(name)
    if is_complete_download(folder):
        return folder
    if not download:
        raise CheckpointError(
            f"{name} is not (completely) in {folder}",
            hint=f"turn on download_if_missing to fetch it, or put its files there by hand: {FILES_HINT}",
        )
    download_published(name, folder, progress)
    return folder


def unknown_model(name: str) -> str:
    """What the loader says of a model name that is neither a folder here nor a published model: at
    queue time (validate_inputs) and when it runs."""
    roots = ", ".join(str(root) for root in model_roots())
    return (f"no VILA-U model named '{name}' in {roots}: choose one of the list (a published model downloads), or "
            "put the model folder (config.json, llm/, vision_tower/, mm_projector/) in one of those folders and "
            "refresh the page (press R)")


def published_folder(repo_id: str) -> Path:
    """Where a published model is (any root holding a folder of its name), or goes (models/vila-u/<name>)."""
    leaf = repo_id.split("/")[-1]
    for root in model_roots():
        for candidate in (root / leaf, root / repo_id):
            if candidate.is_dir():
                return candidate
    return default_root() / leaf
