"""What an API caller can make Caption Folder read and write, through a real ComfyUI 0.3.75.

Any client that can queue a prompt fills in `folder`. By default only ComfyUI's input and output
folders are captioned (after resolving links and `..`); roots elsewhere come only from the
server's configuration (extra_model_paths.yaml's `vila_u_caption_roots`, the environment variable
VILA_U_CAPTION_ROOTS read at start-up). A refusal reads the same whether the path exists or not.
And a folder of problem files (a FIFO, an image whose header claims 400 megapixels, a link out)
is captioned to the end inside the server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa
from conftest import png_header

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

SMALL = "vila-u-small-64"
REFUSAL = "Caption Folder reads and writes only inside ComfyUI's input and output folders"


def noise_png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("places")
    named = {name: base / name for name in ("elsewhere", "yaml_root", "env_root")}
    for i, folder in enumerate(named.values()):
        noise_png(folder / "img.png", i)
    return named


@pytest.fixture(scope="module")
def server(tmp_path_factory, places):
    from vilau_backend.testing.random_checkpoint import write_random_checkpoint

    run = tmp_path_factory.mktemp("run")
    write_random_checkpoint(run / "models" / "vila-u" / SMALL)
    yaml = run / "extra_model_paths.yaml"
    yaml.write_text(f"datasets:\n    vila_u_caption_roots: {places['yaml_root']}\n")
    env = {"OMP_NUM_THREADS": "1", "VILA_U_CAPTION_ROOTS": str(places["env_root"])}
    srv = cs.ComfyServer(cs.comfyui_dir(), run, {cs.PACK: cs.REPO_ROOT}, extra_model_paths=yaml, env=env)
    srv.start(timeout=180)
    assert not srv.import_failed(cs.PACK), srv.log_tail()
    yield srv
    srv.stop()


def caption_graph(folder, **extra) -> dict:
    inputs = {"model": ["1", 0], "folder": str(folder), "question": "Describe the image.",
              "existing_captions": "overwrite", "prefix": "", "suffix": "", "recursive": True, "seed": 0,
              "max_new_tokens": 3, "do_sample": False, "temperature": 0.9, "top_k": 50, "top_p": 0.6,
              "repetition_penalty": 1.0, **extra}
    return {"1": wa.loader_node(SMALL), "2": {"class_type": "VILAU_CaptionFolder", "inputs": inputs},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def refusal(server, folder) -> str:
    with pytest.raises(cs.ExecutionFailed) as caught:
        server.run(caption_graph(folder), timeout=120)
    assert caught.value.error["node_id"] == "2", caught.value.error
    return caught.value.error["exception_message"]


def summary(server, folder, **extra) -> str:
    return server.ui_text(server.run(caption_graph(folder, **extra), timeout=180), "3")[0]


def captions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.txt"))


def test_folders_outside_input_and_output_are_refused_alike_whether_or_not_they_exist(server, places):
    elsewhere = places["elsewhere"]
    os.symlink(elsewhere, server.input_dir / "link_out", target_is_directory=True)
    relative_up = os.path.relpath(elsewhere, server.input_dir)  # ../../…/elsewhere
    tries = {
        "absolute, existing": str(elsewhere), "absolute, missing": str(elsewhere.parent / "no_such_folder"),
        "relative with ..": relative_up, "relative with .., missing": relative_up + "_missing",
        "a link in input to outside": "link_out", "/etc": "/etc", "the models folder": str(server.models_dir),
    }
    messages = {name: refusal(server, folder).strip() for name, folder in tries.items()}
    rests = set()
    for name, message in messages.items():
        assert message.startswith(f"'{tries[name]}': {REFUSAL}"), (name, message)
        rests.add(message[len(f"'{tries[name]}': "):])
    assert len(rests) == 1, rests  # one text for all, after the path as typed: existence is not told
    assert captions(elsewhere) == [] and captions(server.models_dir) == []


def test_input_output_and_the_configured_roots_are_captioned(server, places):
    noise_png(server.input_dir / "cb_in" / "a.png", 1)
    noise_png(server.output_dir / "cb_out" / "b.png", 2)
    assert summary(server, "cb_in").startswith(f"1 caption(s) written in {server.input_dir / 'cb_in'}")
    assert summary(server, server.output_dir / "cb_out").startswith("1 caption(s) written")
    for root in ("yaml_root", "env_root"):
        assert summary(server, places[root]).startswith(f"1 caption(s) written in {places[root]}"), root
        assert captions(places[root]) == ["img.txt"]
    assert captions(server.input_dir / "cb_in") == ["a.txt"] and captions(server.output_dir / "cb_out") == ["b.txt"]


def test_prefix_and_suffix_are_text_and_never_part_of_a_path(server):
    folder = server.input_dir / "cb_prefix"
    noise_png(folder / "p.png", 3)
    prefix, suffix = "../../../escaped/", "/../x\x00"
    summary(server, folder, prefix=prefix, suffix=suffix)
    assert sorted(p.name for p in folder.iterdir()) == ["p.png", "p.txt"]
    text = (folder / "p.txt").read_text(encoding="utf-8")
    assert text.startswith(prefix) and text.endswith(suffix)
    assert not (server.run_dir / "escaped").exists() and not (server.input_dir.parent / "escaped").exists()


def test_a_folder_of_problem_files_is_captioned_to_the_end_inside_the_server(server, places):
    folder = server.input_dir / "cb_problems"
    noise_png(folder / "a.png", 4)
    png_header(folder / "huge.png", 20000, 20000)
    os.mkfifo(folder / "fifo.png")
    os.symlink(places["elsewhere"] / "img.png", folder / "out.png")
    noise_png(folder / "sub" / "z.png", 5)
    finished = False
    try:
        text = summary(server, folder)
        finished = True
    finally:
        if not finished:  # a worker blocked on the FIFO: release it so the server can stop
            with open(folder / "fifo.png", "wb", buffering=0) as fifo:
                fifo.write(b"x")
    lines = text.splitlines()
    assert lines[0] == f"2 caption(s) written in {folder}, 2 image(s) skipped, 1 failed."
    assert "skipped: fifo.png: not a regular file (a FIFO)" in lines
    assert "skipped: out.png: a link to outside the folder, not followed" in lines
    assert any(line.startswith("failed: huge.png: cannot read the image: too large by its header") for line in lines)
    assert captions(folder) == ["a.txt", "z.txt"] and captions(places["elsewhere"]) == []
