"""A folder or a batch whose size is not a multiple of the batch size compiles one answer step
only: its short last batch is padded to the compiled size instead of compiling a size of its own."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.media.files import read_image
from vilau_backend.tasks.captioning import CaptionSettings, caption_folder
from vilau_backend.tasks.understand import GREEDY, describe_images

QUESTION = "Describe the image."


def test_short_last_batch_replays_the_compiled_step(small_checkpoint, tmp_path):
    from torch._dynamo.utils import counters

    model = VilaUModel.load(small_checkpoint, dtype="float32", device="cpu")  # its own: no size compiled yet
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    counters.clear()
    notices = []
    settings = CaptionSettings(question=QUESTION, sampling=GREEDY, max_new_tokens=5, batch_size=2, compile=True)
    report = caption_folder(model, folder, settings, on_compile=lambda: notices.append("compiling"))
    assert len(report.written) == 3
    assert notices == ["compiling"]  # batches of 2 and 1: one size compiled
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

    images = [read_image(folder / f"{i}.png") for i in (2, 0, 1)]
    answers = describe_images(model, images, QUESTION, batch=True, batch_size=2, sampling=GREEDY, max_new_tokens=5,
                              compile=True, on_compile=lambda: notices.append("compiling"))
    assert notices == ["compiling"] and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # the short batch's answer is the one the image gets in a full batch of the compiled size
    assert (folder / "2.txt").read_text(encoding="utf-8") == answers[0].text
    assert [a.text for a in answers[1:]] == [(folder / f"{i}.txt").read_text(encoding="utf-8") for i in (0, 1)]
