"""Which folders a path typed into a node may reach.

Anyone who can queue a prompt (any API client of the server, not only the person at the
canvas) fills in path inputs. A path is therefore resolved first (links and ``..``
followed, as the operating system would follow them) and accepted only inside one of the
allowed roots the server's own configuration gives. A refused path gets the same message
whether or not it exists, so that the refusal tells nothing about the machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError


def resolve_within(text: str, roots: Sequence[str | os.PathLike], base: str | os.PathLike, refusal: str) -> Path:
    """`text` (absolute, or relative to `base`) as a resolved path inside one of `roots` (themselves
    resolved); InputError with `refusal` (which must not depend on the path) otherwise."""
    text = text.strip()
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = Path(base) / candidate
    resolved = os.path.realpath(candidate)
    if any(is_inside(resolved, os.path.realpath(root)) for root in roots):
        return Path(resolved)
    raise InputError(f"'{text}': {refusal}")


def is_inside(path: str, real_root: str) -> bool:
    """Whether the resolved `path` is the resolved `real_root` or lies under it (case-insensitively
    where the platform's paths are: Windows)."""
    path, real_root = os.path.normcase(path), os.path.normcase(real_root)
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)
