"""Captioning a folder: one <image name>.txt beside each image, written whole, nothing else touched."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vilau_backend.tasks.captioning as captioning
from vilau_backend.media.files import read_image
from vilau_backend.tasks.captioning import CaptionSettings, caption_folder, write_caption
from vilau_backend.errors import InputError
from vilau_backend.tasks.requests import AnswerRequest
from vilau_backend.tasks.understand import GREEDY, describe_images

FAST = dict(sampling=GREEDY, max_new_tokens=3)


def write_png(path: Path, seed: int, size: int = 24) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_caption_settings_ask_every_image_one_answer_request():
    settings = CaptionSettings(question="What?", prefix="ohwx, ", batch_size=2, seed=5, **FAST)
    assert settings.answer_request() == AnswerRequest(question="What?", batch=True, batch_size=2, seed=5, **FAST)
    assert CaptionSettings().answer_request().question == "Describe the image in detail."
    with pytest.raises(InputError, match="batch_size \\(answers generated together\\) must be 1 or more, got 0"):
        CaptionSettings(batch_size=0)  # refused by AnswerRequest's own check, when the settings are made
    with pytest.raises(InputError, match="one answer per image"):
        CaptionSettings(batch=False)


def test_a_share_takes_the_images_of_its_places_in_the_sorted_listing(tmp_path):
    """Process 1 of 2 takes places 1, 3, ...; only the first share reports what the folder passed over."""
    from vilau_backend.tasks.shares import Share

    root = tmp_path / "split"
    for name in ["a.png", "b.png", "c.png", "d.png", "e.png"]:
        write_png(root / name, 0)
    (root / ".hidden.png").write_bytes(b"")
    settings = CaptionSettings(**FAST)
    taken = {}
    for index in (0, 1):
        report = captioning.CaptionReport(root)
        taken[index] = [p.name for p in captioning._images_to_caption(root, settings, report, Share(index, 2))]
        assert bool(report.skipped) == (index == 0), report.skipped
    assert taken == {0: ["a.png", "c.png", "e.png"], 1: ["b.png", "d.png"]}


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "dataset"
    for i, name in enumerate(["b.png", "a.jpg", "c.webp"]):
        write_png(root / name, i)
    write_png(root / "sub" / "d.png", 3)
    (root / "notes.md").write_text("not an image")
    return root


def test_writes_one_caption_beside_each_image_with_prefix_and_suffix(golden_fp32, folder):
    settings = CaptionSettings(prefix="ohwx, ", suffix=" [end]", batch_size=2, **FAST)
    report = caption_folder(golden_fp32, folder, settings)
    images = [folder / "a.jpg", folder / "b.png", folder / "c.webp"]  # sorted: the order they are captioned in
    expected = describe_images(golden_fp32, [read_image(p) for p in images], settings.question, batch=True,
                               batch_size=2, **FAST)  # like with like: the same two passes
    assert report.written == [p.with_suffix(".txt") for p in images]
    for image, answer in zip(images, expected):
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == f"ohwx, {answer.text} [end]"
    assert files(folder) == {"a.jpg", "b.png", "c.webp", "notes.md", "sub/d.png", "a.txt", "b.txt", "c.txt"}
    assert report.summary().startswith(f"3 caption(s) written in {folder}, 0 image(s) skipped, 0 failed.")


def test_recursive_captions_subfolders(golden_fp32, folder):
    report = caption_folder(golden_fp32, folder, CaptionSettings(recursive=True, **FAST))
    assert len(report.written) == 4 and (folder / "sub" / "d.txt").is_file()


def test_existing_captions_are_skipped_or_overwritten(golden_fp32, folder):
    (folder / "b.txt").write_text("my own caption")
    report = caption_folder(golden_fp32, folder, CaptionSettings(**FAST))
    assert (folder / "b.txt").read_text() == "my own caption"
    assert [(p.name, why) for p, why in report.skipped] == [("b.png", "b.txt exists")]
    assert "skipped: b.png: b.txt exists" in report.summary()
    again = caption_folder(golden_fp32, folder, CaptionSettings(overwrite=True, **FAST))
    assert len(again.written) == 3 and (folder / "b.txt").read_text() != "my own caption"


@pytest.mark.parametrize("where", ["missing", "file", "empty"])
def test_refuses_folders_that_do_not_exist_or_are_files(golden_fp32, tmp_path, where):
    target = {"missing": tmp_path / "nope", "file": write_png(tmp_path / "x.png", 0), "empty": ""}[where]
    message = {"missing": "does not exist", "file": "is a file, not a folder", "empty": "no folder given"}[where]
    with pytest.raises(InputError, match=message):
        caption_folder(golden_fp32, target, CaptionSettings(**FAST))


def test_folder_without_images_is_an_input_error(golden_fp32, tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="holds no images"):
        caption_folder(golden_fp32, tmp_path, CaptionSettings(**FAST))


def test_symlinks_out_of_the_folder_are_not_followed(golden_fp32, tmp_path):
    outside = tmp_path / "outside"
    write_png(outside / "secret.png", 7)
    root = tmp_path / "dataset"
    write_png(root / "inside.png", 1)
    os.symlink(outside / "secret.png", root / "linked_out.png")
    os.symlink(root / "inside.png", root / "linked_in.png")
    os.symlink(outside, root / "linked_dir", target_is_directory=True)
    report = caption_folder(golden_fp32, root, CaptionSettings(recursive=True, **FAST))
    assert sorted(p.name for p in report.written) == ["inside.txt", "linked_in.txt"]
    assert files(outside) == {"secret.png"}  # nothing written outside, not even through the linked folder


def test_caption_name_shared_by_two_images_goes_to_the_first(golden_fp32, tmp_path):
    write_png(tmp_path / "x.png", 1)
    write_png(tmp_path / "x.jpg", 2)
    report = caption_folder(golden_fp32, tmp_path, CaptionSettings(**FAST))
    assert [p.name for p in report.written] == ["x.txt"]
    assert [(p.name, why) for p, why in report.skipped] == [("x.png", "x.txt is the caption of x.jpg")]


def test_unreadable_image_fails_alone(golden_fp32, folder):
    (folder / "broken.png").write_bytes(b"not a png")
    report = caption_folder(golden_fp32, folder, CaptionSettings(**FAST))
    assert [p.name for p, _ in report.failed] == ["broken.png"]
    assert "cannot read the image" in report.failed[0][1]
    assert len(report.written) == 3 and not (folder / "broken.txt").exists()


def test_cancel_keeps_finished_captions_and_leaves_no_partial_file(golden_fp32, folder):
    events = []

    def cancel_in_second_batch(event):
        events.append(event)
        if event.done == 2 and event.step == 1:
            raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        caption_folder(golden_fp32, folder, CaptionSettings(batch_size=2, **FAST), on_progress=cancel_in_second_batch)
    assert files(folder) == {"a.jpg", "b.png", "c.webp", "notes.md", "sub/d.png", "a.txt", "b.txt"}
    finished = caption_folder(golden_fp32, folder, CaptionSettings(batch_size=2, **FAST))  # resumes
    assert [p.name for p in finished.written] == ["c.txt"] and len(finished.skipped) == 2


def test_images_are_read_one_batch_at_a_time(golden_fp32, tmp_path, monkeypatch):
    for i in range(7):
        write_png(tmp_path / f"{i}.png", i)
    loaded, seen_at_first_token = [], []
    monkeypatch.setattr(captioning, "read_image", lambda path, *root: loaded.append(path) or read_image(path, *root))

    def progress(event):
        if event.step == 0 and event.images:
            seen_at_first_token.append(len(loaded))

    caption_folder(golden_fp32, tmp_path, CaptionSettings(batch_size=3, **FAST), on_progress=progress)
    assert seen_at_first_token == [3, 6, 7]


def test_progress_counts_images_and_tokens(golden_fp32, folder):
    events = []
    caption_folder(golden_fp32, folder, CaptionSettings(batch_size=2, **FAST), on_progress=events.append)
    assert [(e.done, e.step, len(e.images)) for e in events] == [
        (0, 0, 2), (0, 1, 2), (0, 2, 2), (2, 0, 0), (2, 0, 1), (2, 1, 1), (2, 2, 1), (3, 0, 0)]
    assert events[2].texts == [(folder / n).read_text() for n in ("a.txt", "b.txt")]
    assert all(e.total == 3 for e in events)


def test_write_caption_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    write_caption(target, "first café")
    assert target.read_bytes() == "first café".encode()

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(captioning.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_caption(target, "second")
    assert target.read_text(encoding="utf-8") == "first café"
    assert files(tmp_path) == {"a.txt"}  # the temporary file is gone


def test_write_caption_replaces_a_link_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    link = tmp_path / "a.txt"
    os.symlink(outside, link)
    write_caption(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and outside.read_text() == "keep me"


def test_read_image_matches_comfyui_load_image_values(tmp_path):
    path = write_png(tmp_path / "x.png", 5, size=8)
    image = read_image(path)
    assert image.shape == (1, 8, 8, 3) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0))
