"""Files in and out (vilau_backend/media/files.py): the one image reader that the command line and
Caption Folder share, PNGs of generated images, files written whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vilau_backend.errors import InputError
from vilau_backend.media.files import png_bytes, read_image, write_file_whole

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)


def test_an_rgba_image_reads_as_its_rgb_and_a_mask_as_its_luminance(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (1, 5, 7, 3) and torch.equal(image[0], torch.from_numpy(rgba[..., :3] / np.float32(255)))
    grey = np.random.default_rng(1).integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "mask.png")
    mask = read_image(tmp_path / "mask.png", mode="L")
    assert mask.shape == (1, 5, 7, 1) and torch.equal(mask[0, ..., 0], torch.from_numpy(grey / np.float32(255)))


def test_the_command_line_names_the_image_it_cannot_read(tmp_path):
    from vilau_backend.cli import read_image_file

    (tmp_path / "x.png").write_text("not a picture")
    with pytest.raises(InputError, match=rf"^cannot read image {tmp_path / 'x.png'}: not an image PIL can read"):
        read_image_file(tmp_path / "x.png")


def test_a_png_written_whole_holds_the_image_truncated_to_8_bits_and_nothing_else(tmp_path):
    image = torch.tensor([[[0.0, 0.5, 1.0], [0.999, 0.25, 0.1]]])  # (1, 2, 3): H=1, W=2
    path = write_file_whole(tmp_path / "out.png", png_bytes(image))
    assert np.array_equal(np.asarray(Image.open(path)), [[[0, 127, 255], [254, 63, 25]]])
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # the temporary file was renamed over it
