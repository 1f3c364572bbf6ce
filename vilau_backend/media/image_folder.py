"""What a folder to caption holds, and reading its images safely.

A real folder holds more than images: links (to files inside it, or anywhere on the
machine), special files (a FIFO named ``x.png`` would block ``open()`` until someone
writes to it), images whose header claims billions of pixels, hidden files, folders
that cannot be written. Each of these is named with its reason, never a reason to stop:

- :func:`list_folder` lists the images to caption, in sorted order, and what it passes
  over: links that lead out of the folder (or nowhere), files that are not regular files,
  hidden files, and (recursively) hidden or linked folders, which are not walked.
  Nothing is opened while listing; an entry's type comes from the directory itself.
- :func:`read_image` opens only a regular file inside the folder (the link's target
  resolved and checked, opened without following a link, never blocking, its type checked
  again on the open file) and refuses an image larger than ``MAX_IMAGE_PIXELS`` by its
  header, before decoding it.
- :func:`unwritable_reason` tries a folder for writing before any of its images is
  captioned, so the work is not lost at the end.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .path_boundary import is_inside

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# 64 megapixels (8192 x 8192; a 50-megapixel camera's 8192 x 5464 fits): the whole image is held as
# float32 (12 bytes a pixel, 0.8 GB at the limit) before the model's resize, as Load Image holds it
MAX_IMAGE_PIXELS = 8192 * 8192
# open flags: a link at the last step is an error (not followed), a FIFO opens without waiting for a writer
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


class UnreadableImage(Exception):
    """One file that cannot be captioned; its message is the reason shown in the summary."""


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
    return None if stat.S_ISREG(mode) else f"not a regular file ({_kind(mode)})"


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_image(path: Path, root: Path | None = None) -> torch.Tensor:
    """An image file as ComfyUI's Load Image gives it: (1, H, W, 3) float32 k/255, EXIF-rotated.

    Only a regular file is read, and, when `root` is given, only one inside it (a link is
    resolved and its target checked). Raises UnreadableImage with the reason."""
    from PIL import Image, ImageOps

    with _open_regular(path, root) as file:
        try:
            image = Image.open(file)
        except Image.DecompressionBombError as error:  # PIL's own, far larger limit: still too large
            raise UnreadableImage(f"too large by its header ({error}); {_limit_text()}") from None
        except Exception as error:  # PIL's plugins raise many kinds for a damaged file
            raise UnreadableImage(f"not an image PIL can read ({type(error).__name__}: {error})") from None
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnreadableImage(f"too large: {width} x {height} pixels by its header; {_limit_text()}")
            try:
                rgb = ImageOps.exif_transpose(image).convert("RGB")
            except Exception as error:
                raise UnreadableImage(f"cannot decode the image ({type(error).__name__}: {error})") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]


def _limit_text() -> str:
    return f"the limit is {MAX_IMAGE_PIXELS:,} pixels (8192 x 8192); downscale it to caption it"


def _open_regular(path: Path, root: Path | None):
    target = os.path.realpath(path)
    if root is not None and not is_inside(target, os.path.realpath(root)):
        raise UnreadableImage("a link to outside the folder, not followed")
    try:
        descriptor = os.open(target, _OPEN_FLAGS)
    except OSError as error:
        raise UnreadableImage(f"cannot open it: {error.strerror or error}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):  # replaced since it was listed
        os.close(descriptor)
        raise UnreadableImage(f"not a regular file ({_kind(mode)})")
    return os.fdopen(descriptor, "rb")


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
