"""The folders Caption Folder may read and write: ComfyUI's input and output folders, and the
roots the server's own configuration adds.

An API caller fills in the `folder` input, so the input alone must not reach the rest of the
machine (ComfyUI's own nodes keep callers inside input, output and temp). Other roots, e.g. a
dataset on another disk, are added where a caller can't reach:

- the key `vila_u_caption_roots` in extra_model_paths.yaml (read by ComfyUI at start-up);
- the environment variable VILA_U_CAPTION_ROOTS (paths separated by os.pathsep), read once
  when the pack is loaded.
"""

from __future__ import annotations

import os

YAML_KEY = "vila_u_caption_roots"
ENV_VAR = "VILA_U_CAPTION_ROOTS"
REFUSAL = (
    "Caption Folder reads and writes only inside ComfyUI's input and output folders (a relative path is "
    f"taken under the input folder); to caption a folder elsewhere, the server's owner adds it under "
    f"'{YAML_KEY}' in extra_model_paths.yaml or in the {ENV_VAR} environment variable and restarts ComfyUI"
)

# read at start-up: a change later (or by a caller) does not widen the roots
_ENV_ROOTS = tuple(os.path.abspath(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip())


def caption_roots() -> list[str]:
    """Input, output, then the configured roots."""
    import folder_paths

    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory()]
    configured = folder_paths.folder_names_and_paths.get(YAML_KEY)
    if configured:
        roots += configured[0]
    return roots + list(_ENV_ROOTS)


def resolve_caption_folder(folder: str) -> str:
    """The folder input as a resolved path inside the allowed roots (relative: under the input
    folder); an empty input is passed on for the backend to explain."""
    import folder_paths

    from ..vilau_backend.media.path_boundary import resolve_within

    if not folder.strip():
        return folder
    return str(resolve_within(folder, caption_roots(), folder_paths.get_input_directory(), REFUSAL))
