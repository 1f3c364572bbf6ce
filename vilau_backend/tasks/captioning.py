"""Captioning a folder of images: one ``<image name>.txt`` beside each image (LoRA datasets).

The folder is walked once (sorted, so runs are repeatable), then the images are read,
answered and written a batch at a time: only one batch of images is ever in memory, so a
folder of thousands works. Each caption is written to a temporary file in the same folder
and renamed over its final name (an atomic replace on POSIX and Windows), so a reader (or a
cancelled run) sees either no caption or a whole one, never half of one.

What is touched, and what is not (vilau_backend/media/image_folder.py lists, media/files.py reads
and writes):

- only files with an image suffix count; hidden files (``.name``), links out of the folder
  and special files (FIFOs, devices) are skipped, and named in the summary with the reason;
- symlinks are never followed out of the folder: linked folders are not walked, and a
  linked image whose target lies outside the folder is skipped;
- the only files written are ``<image stem>.txt`` beside their image (an existing link there is
  replaced by a plain file, never written through); two images with one stem (``a.png``,
  ``a.jpg``) share a caption name, so only the first in sorted order is captioned;
- a folder that cannot be written is found before its images are captioned, and passed over.

One file never stops the run: an image that cannot be read (too large by its header, not
decodable, not a regular file any more) or whose caption cannot be written is listed as
failed with the reason, and the run goes on with the next one. Which folders may be
captioned at all is the caller's decision (the ComfyUI node's: nodes/caption_roots.py, through
vilau_backend/media/path_boundary.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..media.files import UnreadableImage, read_image, write_file_whole
from ..media.image_folder import IMAGE_SUFFIXES, list_folder, unwritable_reason
from ..errors import InputError
from ..decoding.compiled_steps import CompileCallback
from .requests import AnswerRequest
from .shares import Share
from .understand import answer_each_image

CAPTION_SUFFIX = ".txt"
SUMMARY_LISTED = 10  # skipped or failed files named in the summary; the rest are counted


@dataclass(frozen=True)
class CaptionSettings(AnswerRequest):
    """How a folder is captioned: the answer request asked of every image (its fields, and their
    checks, are AnswerRequest's; here one answer per image, `batch_size` generated together), and
    what becomes of the answers. ``prefix`` and ``suffix`` go around every caption exactly as
    given (include separators, e.g. ``"ohwx, "``)."""

    question: str = "Describe the image in detail."
    batch: bool = True  # a caption per image, never one answer about several
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False  # False: images that already have a caption are skipped
    recursive: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.batch:
            raise InputError("a folder is captioned with one answer per image: leave batch on")

    def answer_request(self) -> AnswerRequest:
        """The question asked of every image, as the answer task takes it."""
        return AnswerRequest(**{f.name: getattr(self, f.name) for f in fields(AnswerRequest)})


@dataclass
class CaptionReport:
    folder: Path
    written: list[Path] = field(default_factory=list)  # caption files
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (image, why)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, error)
    folders: list[tuple[Path, str]] = field(default_factory=list)  # (subfolder or the folder, why not captioned)

    def summary(self) -> str:
        lines = [
            f"{len(self.written)} caption(s) written in {self.folder}, {len(self.skipped)} image(s) skipped, "
            f"{len(self.failed)} failed." + (f" {len(self.folders)} folder(s) passed over." if self.folders else "")
        ]
        for title, entries in (("folder", self.folders), ("skipped", self.skipped), ("failed", self.failed)):
            for image, why in entries[:SUMMARY_LISTED]:
                lines.append(f"{title}: {_relative(image, self.folder)}: {why}")
            if len(entries) > SUMMARY_LISTED:
                lines.append(f"... and {len(entries) - SUMMARY_LISTED} more {title}")
        return "\n".join(lines)


def _relative(path: Path, folder: Path) -> str:
    return "." if path == folder else str(path.relative_to(folder))


@dataclass(frozen=True)
class CaptionEvent:
    """Where a run stands: `done` of `total` images finished (written or failed), and the current
    batch's images with their captions so far after token `step`. When a batch is finished, an
    event with no images marks it."""

    done: int
    total: int
    step: int
    images: list[Path]
    texts: list[str]


CaptionCallback = Callable[[CaptionEvent], object]


def caption_folder(
    model, folder: str | os.PathLike, settings: CaptionSettings = CaptionSettings(),
    on_progress: CaptionCallback | None = None,
    on_compile: CompileCallback | None = None,
    share: Share = Share(),
    report: CaptionReport | None = None,
) -> CaptionReport:
    """Write a caption beside every image of `folder` (see the module's docstring for what is touched).

    Whatever `on_progress` raises (a cancel) stops the run between two tokens and reaches the
    caller: the captions of earlier batches are on disk, the current batch's are not written.

    share: this run takes only the images of the sorted listing that the share owns (one of several
    processes splitting a folder; the split does not depend on which captions exist yet);
    the folder-wide findings (files passed over, folders skipped) are the first share's to report.
    `report`, when given, is filled as the run goes (a caller can read it at each progress event)."""
    request = settings.answer_request()
    root = _checked_folder(folder)
    report = CaptionReport(root) if report is None else report
    report.folder = root
    todo = _images_to_caption(root, settings, report, share)
    done = 0
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
        images, pixels = _read_batch(model, batch, report)
        if images:
            texts = _caption_batch(model, pixels, images, request, on_progress, on_compile, done, len(todo))
            for image, text in zip(images, texts):
                _write_one(report, image, settings.prefix + text + settings.suffix)
        done += len(batch)
        if on_progress is not None:
            on_progress(CaptionEvent(done, len(todo), 0, [], []))
    return report


def _write_one(report: CaptionReport, image: Path, text: str) -> None:
    target = caption_path(image)
    try:
        report.written.append(write_caption(target, text))
    except OSError as error:  # a full disk, a name the file system refuses, a folder changed meanwhile
        report.failed.append((image, f"cannot write {target.name}: {error.strerror or error}"))


def caption_path(image: Path) -> Path:
    return image.with_suffix(CAPTION_SUFFIX)


def write_caption(path: Path, text: str) -> Path:
    """Write `text` to `path` all at once: a temporary file in the same folder, then renamed over it."""
    return write_file_whole(path, text.encode("utf-8"))


def _checked_folder(folder: str | os.PathLike) -> Path:
    text = str(folder).strip()
    if not text:
        raise InputError("no folder given: enter the path of a folder of images")
    root = Path(text).expanduser()
    if not root.exists():
        raise InputError(f"folder '{root}' does not exist; give the path of an existing folder of images")
    if not root.is_dir():
        raise InputError(f"'{root}' is a file, not a folder; give the folder that holds the images")
    return root.absolute()


def _images_to_caption(
    root: Path, settings: CaptionSettings, report: CaptionReport, share: Share = Share(),
) -> list[Path]:
    listing = list_folder(root, settings.recursive)
    if share.index == 0:
        report.skipped += listing.skipped
        report.folders += listing.folders
    todo, owners, unwritable, mine = [], {}, {}, []
    for place, image in enumerate(listing.images):
        target = caption_path(image)
        if not share.owns(place):
            owners.setdefault(target, image)  # another process's image, still the owner of its caption name
            continue
        mine.append(image)
        if target in owners:
            report.skipped.append((image, f"{target.name} is the caption of {owners[target].name}"))
            continue
        owners[target] = image
        if target.exists() or target.is_symlink():
            if not settings.overwrite:
                report.skipped.append((image, f"{target.name} exists"))
                continue
            if target.is_dir():
                report.skipped.append((image, f"{target.name} is a folder"))
                continue
        if image.parent not in unwritable:  # tried once per folder, before any of its images is captioned
            unwritable[image.parent] = unwritable_reason(image.parent)
        if unwritable[image.parent] is None:
            todo.append(image)
    _report_unwritable(report, unwritable, mine)
    if not owners and not (report.skipped or report.folders):  # no image at all (a share may be empty)
        raise InputError(f"folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})"
                         + ("" if settings.recursive else "; turn on recursive to look in its subfolders"))
    return todo


def _report_unwritable(report: CaptionReport, reasons: dict[Path, str | None], images: list[Path]) -> None:
    for folder, why in reasons.items():
        if why is not None:
            count = sum(1 for image in images if image.parent == folder)
            report.folders.append((folder, f"not writable ({why}); its {count} image(s) were not captioned"))


def _read_batch(model, batch: list[Path], report: CaptionReport) -> tuple[list[Path], torch.Tensor | None]:
    """Read and preprocess a batch of images -> the readable ones and their pixels (B, 3, S, S)."""
    images, pixels = [], []
    for path in batch:
        try:
            pixels.append(model.preprocess(read_image(path, report.folder)))
        except UnreadableImage as error:
            report.failed.append((path, f"cannot read the image: {error}"))
            continue
        except (OSError, ValueError) as error:  # e.g. a size the model's preprocessing refuses
            report.failed.append((path, f"cannot use the image: {error}"))
            continue
        images.append(path)
    return images, (torch.cat(pixels) if pixels else None)


def _caption_batch(
    model, pixels: torch.Tensor, images: list[Path], request: AnswerRequest,
    on_progress: CaptionCallback | None, on_compile: CompileCallback | None, done: int, total: int,
) -> list[str]:
    report = None
    if on_progress is not None:
        def report(step: int, texts: list[str]) -> None:
            on_progress(CaptionEvent(done, total, step, images, texts))
    answers = answer_each_image(model, pixels, request, on_answers=report, on_compile=on_compile,
                                pad_to=request.batch_size)
    return [answer.text for answer in answers]
