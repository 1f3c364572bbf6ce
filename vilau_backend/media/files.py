"""Files in and out, without surprises: an image read as ComfyUI's Load Image gives it (only a
regular file, opened without following a link or blocking, its size checked by its header before
it is decoded), a PNG of a generated image, and a file written whole (a reader sees no file or all
of it: a temporary file in the same folder, then renamed over the name)."""

from __future__ import annotations

import io
import os
import secrets
import stat
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .path_boundary import is_inside

# 64 megapixels (8192 x 8192; a 50-megapixel camera's 8192 x 5464 fits): the whole image is held as
# float32 (12 bytes a pixel, 0.8 GB at the limit) before the model's resize, as Load Image holds it
MAX_IMAGE_PIXELS = 8192 * 8192
# open flags: a link at the last step is an error (not followed), a FIFO opens without waiting for a writer
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


class UnreadableImage(InputError):
    """An image file that cannot be read; its message is the reason (a caption run's summary lists it
    beside the file)."""


def read_image(path: Path, root: Path | None = None, mode: str = "RGB") -> torch.Tensor:
    """An image file as ComfyUI's Load Image gives it: (1, H, W, 3) float32 k/255, EXIF-rotated;
    mode "L" (a mask): its luminance, (1, H, W, 1).

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
                pixels = np.asarray(ImageOps.exif_transpose(image).convert(mode), dtype=np.float32)
            except Exception as error:
                raise UnreadableImage(f"cannot decode the image ({type(error).__name__}: {error})") from None
    return torch.from_numpy(pixels / 255.0).reshape(1, *pixels.shape[:2], -1)  # (1, H, W, C)


def _limit_text() -> str:
    return f"the limit is {MAX_IMAGE_PIXELS:,} pixels (8192 x 8192); downscale it"


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
        raise UnreadableImage(f"not a regular file ({file_kind(mode)})")
    return os.fdopen(descriptor, "rb")


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, by its stat mode."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def png_bytes(image: torch.Tensor) -> bytes:
    """(H, W, 3) float 0..1 -> PNG, truncating to 8 bits as the original's inference.py does."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_file_whole(path: Path, data: bytes) -> Path:
    """Write `data` to `path` all at once (a reader sees no file or the whole file, never part of one)."""
    # a short name of its own: the final name plus a suffix may pass the file system's limit
    temporary = path.with_name(f".vilau-writing-{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL: a new file of our own (never an existing one or a link); 0o666 minus the umask,
        # as any other file the user creates
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)  # replaces a link at `path` itself, never its target
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
