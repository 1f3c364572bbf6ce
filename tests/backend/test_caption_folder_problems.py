"""A real folder holds more than images: every kind of problem file in one folder, captioned to
the end, each problem named in the summary with its reason."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vilau_backend.tasks.captioning as captioning
from conftest import png_header
from vilau_backend.media.files import MAX_IMAGE_PIXELS, UnreadableImage, read_image
from vilau_backend.media.image_folder import unwritable_reason
from vilau_backend.tasks.captioning import CaptionSettings, caption_folder
from vilau_backend.tasks.understand import GREEDY

FAST = dict(sampling=GREEDY, max_new_tokens=3)
LONG_NAME = "n" * 236 + ".png"  # 240 characters: the old temporary name (".<name>.<hex>.tmp") passed 255


def write_png(path: Path, seed: int, size: int = 24) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def hostile(tmp_path) -> dict:
    outside = tmp_path / "outside"
    write_png(outside / "secret.png", 9)
    root = tmp_path / "dataset"
    write_png(root / "a_good.png", 1)
    write_png(root / LONG_NAME, 2)
    png_header(root / "huge.png", 20000, 20000)  # past PIL's own bomb limit: refused while opening
    png_header(root / "big.png", 9000, 9000)  # 81 megapixels: under PIL's limit, over ours
    (root / "broken.png").write_bytes(b"not a png at all")
    whole = write_png(tmp_path / "whole.png", 3, size=64).read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    write_png(root / "nospace.png", 4)  # its caption's write fails (a full disk, played below)
    os.mkfifo(root / "fifo.png")
    os.symlink(outside / "secret.png", root / "link_out.png")
    os.symlink(outside, root / "link_dir", target_is_directory=True)
    write_png(root / ".hidden.png", 5)
    write_png(root / "locked" / "x.png", 6)  # not writable (played below: the tests run as root)
    write_png(root / "sub" / "z_last.png", 7)
    return dict(root=root, outside=outside)


def caption_without_hanging(model, root: Path, settings: CaptionSettings) -> captioning.CaptionReport:
    """caption_folder in a thread: a read blocked on the FIFO fails the test instead of hanging it."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=caption_folder(model, root, settings)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():
        with open(root / "fifo.png", "wb") as fifo:  # release the blocked open()
            fifo.write(b"x")
        pytest.fail("captioning blocked on the FIFO")
    return result["report"]


def test_a_folder_of_problem_files_is_captioned_to_the_end_and_each_problem_is_named(golden_fp32, hostile,
                                                                                    monkeypatch):
    root, outside = hostile["root"], hostile["outside"]
    real_probe, real_replace = captioning.unwritable_reason, captioning.os.replace

    def probe(folder: Path):
        return os.strerror(errno.EACCES) if folder.name == "locked" else real_probe(folder)

    def replace(source, destination):
        if Path(destination).name == "nospace.txt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, destination)

    monkeypatch.setattr(captioning, "unwritable_reason", probe)
    monkeypatch.setattr(captioning.os, "replace", replace)
    report = caption_without_hanging(golden_fp32, root, CaptionSettings(recursive=True, batch_size=3, **FAST))

    assert sorted(p.relative_to(root).as_posix() for p in report.written) == sorted(
        ["a_good.txt", LONG_NAME[:-4] + ".txt", "sub/z_last.txt"])
    failed = {p.name: why for p, why in report.failed}
    assert set(failed) == {"huge.png", "big.png", "broken.png", "truncated.png", "nospace.png"}
    assert failed["big.png"] == ("cannot read the image: too large: 9000 x 9000 pixels by its header; the limit is "
                                 f"{MAX_IMAGE_PIXELS:,} pixels (8192 x 8192); downscale it")
    assert failed["huge.png"].startswith("cannot read the image: too large by its header")
    assert failed["broken.png"].startswith("cannot read the image: not an image PIL can read")
    assert failed["truncated.png"].startswith("cannot read the image: cannot decode the image")
    assert failed["nospace.png"] == f"cannot write nospace.txt: {os.strerror(errno.ENOSPC)}"
    assert {p.name: why for p, why in report.skipped} == {
        ".hidden.png": "hidden file", "fifo.png": "not a regular file (a FIFO)",
        "link_out.png": "a link to outside the folder, not followed"}
    assert {p.name: why for p, why in report.folders} == {
        "link_dir": "a link to a folder, not followed",
        "locked": f"not writable ({os.strerror(errno.EACCES)}); its 1 image(s) were not captioned"}

    summary = report.summary().splitlines()
    assert summary[0] == f"3 caption(s) written in {root}, 3 image(s) skipped, 5 failed. 2 folder(s) passed over."
    for path, why in report.failed + report.skipped + report.folders:
        title = "folder" if (path, why) in report.folders else "failed" if (path, why) in report.failed else "skipped"
        assert f"{title}: {path.relative_to(root)}: {why}" in summary
    # nothing else written: no caption for a problem file, no temporary file left, nothing outside
    captions = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt"))
    assert captions == sorted(p.relative_to(root).as_posix() for p in report.written)
    assert not [p for p in root.rglob(".*") if p.name != ".hidden.png"]
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]


def test_an_unwritable_folder_is_passed_over_before_captioning(golden_fp32, tmp_path, monkeypatch):
    write_png(tmp_path / "a.png", 1)
    captioned = []
    monkeypatch.setattr(captioning, "_caption_batch", lambda *args: captioned.append(args) or [])
    monkeypatch.setattr(captioning, "unwritable_reason", lambda folder: os.strerror(errno.EROFS))
    report = caption_folder(golden_fp32, tmp_path, CaptionSettings(**FAST))
    assert captioned == []  # no work was done that would have been lost
    assert report.summary().splitlines() == [
        f"0 caption(s) written in {tmp_path}, 0 image(s) skipped, 0 failed. 1 folder(s) passed over.",
        f"folder: .: not writable ({os.strerror(errno.EROFS)}); its 1 image(s) were not captioned"]


def test_the_write_probe_leaves_nothing_and_reports_why_a_folder_cannot_be_written(tmp_path):
    assert unwritable_reason(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    assert unwritable_reason(tmp_path / "gone") == os.strerror(errno.ENOENT)


def test_read_image_refuses_a_fifo_at_once_and_a_link_out_of_the_folder(tmp_path):
    os.mkfifo(tmp_path / "f.png")  # no writer: a blocking open() would wait forever
    with pytest.raises(UnreadableImage, match=r"^not a regular file \(a FIFO\)$"):
        read_image(tmp_path / "f.png", tmp_path)
    outside = write_png(tmp_path / "outside" / "s.png", 1)
    (tmp_path / "in").mkdir()
    os.symlink(outside, tmp_path / "in" / "l.png")
    with pytest.raises(UnreadableImage, match="a link to outside the folder"):
        read_image(tmp_path / "in" / "l.png", tmp_path / "in")
    assert read_image(tmp_path / "in" / "l.png", tmp_path).shape == (1, 24, 24, 3)  # inside this root


def test_an_image_at_the_pixel_limit_is_read(tmp_path):
    path = tmp_path / "limit.png"
    Image.new("RGB", (8192, 1)).save(path)  # the limit's width, read (the check is width x height)
    assert read_image(path).shape == (1, 1, 8192, 3)
    png_header(tmp_path / "over.png", 8192, 8193)
    with pytest.raises(UnreadableImage, match="too large: 8192 x 8193 pixels"):
        read_image(tmp_path / "over.png")
