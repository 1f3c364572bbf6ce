"""What a folder to caption holds.

A real folder holds more than images: links (to files inside it, or anywhere on the
machine), special files (a FIFO named ``x.png`` would block ``open()`` until someone
writes to it), images whose header claims billions of pixels, hidden files, folders
that cannot be written. Each of these is named with its reason, never a reason to stop:

- :func:`list_folder` lists the images to caption, in sorted order, and what it passes
  over: links that lead out of the folder (or nowhere), files that are not regular files,
  hidden files, and (recursively) hidden or linked folders, which are not walked.
  Nothing is opened while listing; an entry's type comes from the directory itself.
- its images are read by :func:`vilau_backend.media.files.read_image`, given the folder as the
  root: only a regular file inside it (the link's target resolved and checked, opened without
  following a link, never blocking, its type checked again on the open file), and no image
  larger than ``MAX_IMAGE_PIXELS`` by its header, which is refused before decoding it.
- :func:`unwritable_reason` tries a folder for writing before any of its images is
  captioned, so the work is not lost at the end.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .files import file_kind
from .path_boundary import is_inside

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class FolderListing:
    images: list[Path] = field(default_factory=list)  # to caption, sorted
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # image-named entries passed over, with why
    folders: list[tuple[Path, str]] = field(default_factory=list)  # subfolders not walked, with why


def list_folder(root: Path, recursive: bool) -> FolderListing:
    """The images under `root` (its subfolders too when `recursive`), never through a link that leads out."""
    listing = FolderListing()
    real_root = os.path.realpath(root)
    pending = [root]
    while pending:
        subfolders = _list_one(pending.pop(0), real_root, recursive, listing)
        pending[:0] = subfolders  # depth first, each folder's own files before its subfolders'
    return listing


def _list_one(directory: Path, real_root: str, recursive: bool, listing: FolderListing) -> list[Path]:
    """Add `directory`'s own entries to `listing`; its subfolders to walk."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as error:
        listing.folders.append((directory, f"cannot be listed: {error.strerror or error}"))
        return []
    subfolders = []
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if recursive and entry.name.startswith("."):
                listing.folders.append((path, "hidden folder, not walked"))
            elif recursive:
                subfolders.append(path)
        elif recursive and entry.is_symlink() and os.path.isdir(path):
            listing.folders.append((path, "a link to a folder, not followed"))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            why = _skip_reason(entry, real_root)
            if why:
                listing.skipped.append((path, why))
            else:
                listing.images.append(path)
    return subfolders


def _skip_reason(entry: os.DirEntry, real_root: str) -> str | None:
    if entry.name.startswith("."):
        return "hidden file"
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if not is_inside(target, real_root):
            return "a link to outside the folder, not followed"
        if not os.path.exists(target):
            return "a link to nothing (broken link)"
        if not os.path.isfile(target):
            return "a link to something that is not a regular file"
        return None
    mode = entry.stat(follow_symlinks=False).st_mode
    return None if stat.S_ISREG(mode) else f"not a regular file ({file_kind(mode)})"


def unwritable_reason(directory: Path) -> str | None:
    """None when a caption can be written in `directory`, else why not. Tried by creating and
    removing a file of our own, which also sees read-only mounts, ACLs and quotas."""
    probe = directory / f".vilau-write-check-{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        return error.strerror or str(error)
    os.unlink(probe)
    return None
