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
from collections.abc import Callable
from pathlib import Path

from ..vilau_backend.checkpoint.config import is_vila_u_folder
from ..vilau_backend.errors import CheckpointError

FOLDER_NAME = "vila_u"  # folder_paths key, and the key in extra_model_paths.yaml
DEFAULT_SUBDIR = "vila-u"  # under ComfyUI/models
PUBLISHED = ("mit-han-lab/vila-u-7b-256", "mit-han-lab/vila-u-7b-384")
# published repositories may carry other copies of the weights; the loader reads safetensors
IGNORED_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx"]
FILES_HINT = (
    "config.json at the top; llm/ with config.json, generation_config.json, the tokenizer files "
    "(tokenizer.model, tokenizer_config.json, special_tokens_map.json) and the *.safetensors weights with "
    "their model.safetensors.index.json; vision_tower/ with config.json, preprocessor_config.json and its "
    "*.safetensors; mm_projector/ with config.json and its *.safetensors"
)


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

DownloadProgress = Callable[[int, int], None]  # (bytes done, bytes in total or 0); raising stops the download


def resolve_model(name: str, download: bool, progress: DownloadProgress | None = None) -> Path:
    """The folder of the model chosen in the loader, downloading a published one when allowed."""
    local = local_models()
    if name in local and name not in PUBLISHED:
        return local[name]
    if name not in PUBLISHED:
        roots = ", ".join(str(r) for r in model_roots())
        raise CheckpointError(
            f"no VILA-U model named '{name}' in {roots}",
            hint="put the model folder (config.json, llm/, vision_tower/, mm_projector/) in one of those folders "
            "and refresh the page (press R), or choose one of the published models to download it",
        )
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


def published_folder(repo_id: str) -> Path:
    """Where a published model is (any root holding a folder of its name), or goes (models/vila-u/<name>)."""
    leaf = repo_id.split("/")[-1]
    for root in model_roots():
        for candidate in (root / leaf, root / repo_id):
            if candidate.is_dir():
                return candidate
    return default_root() / leaf


def is_complete_download(folder: Path) -> bool:
    """A VILA-U folder with no unfinished download in it: neither ours (the marker next to it) nor one
    of `hf download --local-dir` (its partial files end in .incomplete)."""
    return not unfinished_marker(folder).exists() and has_all_files(folder)


def has_all_files(folder: Path) -> bool:
    return is_vila_u_folder(folder) and not any((folder / ".cache" / "huggingface").glob("**/*.incomplete"))


def unfinished_marker(folder: Path) -> Path:
    # next to the folder, not in it: snapshot_download treats any non-empty folder as a finished
    # download when the hub cannot be reached
    return folder.parent / f".{folder.name}.unfinished-download"


def download_published(repo_id: str, folder: Path, progress: DownloadProgress | None = None) -> None:
    """Download a published model into `folder`, resuming what an earlier try left. `progress(done, total)`
    (bytes; total 0 while the file list is not known yet) is called about ten times a second from this
    thread whatever the network does; if it raises, the wait ends at once and the exception propagates."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise CheckpointError(
            f"downloading {repo_id} needs huggingface_hub", hint="install it with `pip install huggingface_hub`"
        ) from exc
    from ..vilau_backend.checkpoint.hub import DownloadFailed, download_repo

    folder.mkdir(parents=True, exist_ok=True)
    unfinished_marker(folder).write_text(f"{repo_id}\n", encoding="utf-8")
    try:
        download_repo(repo_id, folder, ignore_patterns=IGNORED_PATTERNS, on_progress=progress)
    except DownloadFailed as exc:
        raise _download_failed(repo_id, folder, exc.reason) from exc
    if not has_all_files(folder):
        raise _download_failed(repo_id, folder, "the download ended but the folder is still incomplete")
    unfinished_marker(folder).unlink()


def _download_failed(repo_id: str, folder: Path, reason: str) -> CheckpointError:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = f"HF_HUB_OFFLINE is set, so nothing can be downloaded ({reason})"
    return CheckpointError(
        f"could not download {repo_id} into {folder}: {reason}",
        hint=f"run `hf download {repo_id} --local-dir \"{folder}\"` (`huggingface-cli download` with older "
        "huggingface_hub) on a machine with internet access (an interrupted download resumes), or put the files "
        f"of https://huggingface.co/{repo_id} there by hand: {FILES_HINT}",
    )
