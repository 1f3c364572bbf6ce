"""The templates' example inputs (example_inputs/ of the pack) in ComfyUI's input folder.

The templates open with files of their own (pictures drawn for the pack, a short video, a
folder to caption), so that each runs as opened once its models are chosen. They are copied
when the pack loads, file by file: a file of the same name already in the input folder is
the user's (or a copy from an earlier start) and is never replaced.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "example_inputs"


def install_example_inputs(input_dir: str | Path, shipped: Path = SHIPPED) -> list[Path]:
    """Copy every shipped example file that input_dir lacks; returns the files written.

    A read-only or full input folder only costs the examples: the pack still loads, and the
    templates say which file is missing."""
    written = []
    for source in sorted(p for p in shipped.rglob("*") if p.is_file()):
        target = Path(input_dir) / source.relative_to(shipped)
        if target.exists():
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out, open(source, "rb") as src:  # "x": never over a file made meanwhile
                shutil.copyfileobj(src, out)
        except OSError as exc:
            if target.is_file():  # made meanwhile (another start): the file is there
                continue
            logging.warning("VILA-U: could not copy the example input %s to %s (%s)", source.name, target, exc)
            continue
        written.append(target)
    return written


def install_into_comfyui_input() -> list[Path]:
    import folder_paths

    return install_example_inputs(folder_paths.get_input_directory())
