"""The allowed-roots check behind Caption Folder's folder input (vilau_backend/media/path_boundary.py)."""

from __future__ import annotations

import os

import pytest

from vilau_backend.errors import InputError
from vilau_backend.media.path_boundary import resolve_within

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

REFUSAL = "not an allowed folder"


@pytest.fixture
def roots(tmp_path):
    made = {name: tmp_path / name for name in ("input", "output", "elsewhere")}
    for folder in made.values():
        (folder / "data").mkdir(parents=True)
    return made


def test_relative_paths_resolve_under_the_base_and_absolute_ones_inside_a_root(roots):
    allowed = [roots["input"], roots["output"]]
    assert resolve_within("data", allowed, roots["input"], REFUSAL) == roots["input"] / "data"
    assert resolve_within(f"  {roots['output'] / 'data'}  ", allowed, roots["input"], REFUSAL) == roots["output"] / "data"
    assert resolve_within("data/../data", allowed, roots["input"], REFUSAL) == roots["input"] / "data"
    assert resolve_within(".", allowed, roots["input"], REFUSAL) == roots["input"]


@pytest.mark.parametrize("path", ["../elsewhere/data", "../elsewhere/missing", "{elsewhere}/data", "{elsewhere}/missing",
                                  "/", "link", "link/missing", "../input_suffix"])
def test_paths_outside_the_roots_get_one_message_whether_or_not_they_exist(roots, path):
    os.symlink(roots["elsewhere"], roots["input"] / "link", target_is_directory=True)
    (roots["input"].parent / "input_suffix").mkdir()  # shares the root's name as a prefix, not a parent
    text = path.format(elsewhere=roots["elsewhere"])
    with pytest.raises(InputError) as caught:
        resolve_within(text, [roots["input"], roots["output"]], roots["input"], REFUSAL)
    assert str(caught.value) == f"'{text}': {REFUSAL}"


def test_a_root_given_through_a_link_is_compared_resolved(roots, tmp_path):
    os.symlink(roots["elsewhere"], tmp_path / "linked_root", target_is_directory=True)
    found = resolve_within(str(roots["elsewhere"] / "data"), [tmp_path / "linked_root"], roots["input"], REFUSAL)
    assert found == roots["elsewhere"] / "data"
