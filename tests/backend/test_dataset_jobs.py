"""Dataset jobs (`caption`, `generate-batch`): the same files whether one process or two (torchrun,
gloo on the CPU) do the work, one merged summary, and a rerun that does only what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from vilau_backend.cli import main as cli_main

PROMPTS = [
    {"prompt": "a red apple on a table", "seed": 7, "name": "apple"},
    {"prompt": "a cat", "cfg": 2.0, "top_k": 50},
    {"prompt": ""},  # fails on its own: empty prompt
    {"prompt": "a boat at sea", "name": "boat", "negative_prompt": "blurry"},
]
CAPTION = ["--greedy", "--max-new-tokens", "4", "--batch-size", "2"]


def read_log(path: Path) -> list[dict]:
    """A process's log (jobs/records.py: JobLog): one record per line; a last line cut short by a crash
    is left out."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vilau_backend", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def outputs(folder: Path, suffix: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"*{suffix}"))}


def summary(folder: Path) -> dict:
    return json.loads((folder / ".vilau-job" / "summary.json").read_text(encoding="utf-8"))


def test_caption_two_processes_write_what_one_process_writes_and_a_rerun_does_nothing(small_checkpoint, tmp_path):
    alone, shared = write_images(tmp_path / "alone", 5), write_images(tmp_path / "shared", 5)
    assert cli_main(["caption", str(alone), "--model", str(small_checkpoint), *CAPTION]) == 0
    result = torchrun("caption", str(shared), "--model", str(small_checkpoint), *CAPTION)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outputs(shared, ".txt") == outputs(alone, ".txt") and len(outputs(alone, ".txt")) == 5
    assert result.stdout.count("5 written, 0 skipped, 0 failed by 2 process(es)") == 1, result.stdout
    assert summary(shared)["written"] == 5 and summary(shared)["processes"] == 2
    logs = {p.name: [e["item"] for e in read_log(p)] for p in (shared / ".vilau-job").glob("log-*.jsonl")}
    assert logs == {"log-process-0.jsonl": ["img0.txt", "img2.txt", "img4.txt"],
                    "log-process-1.jsonl": ["img1.txt", "img3.txt"]}
    times = {p.name: p.stat().st_mtime_ns for p in shared.glob("*.txt")}

    again = torchrun("caption", str(shared), "--model", str(small_checkpoint), *CAPTION)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in shared.glob("*.txt")} == times
    assert (summary(shared)["written"], summary(shared)["skipped"]) == (0, 5)


def test_generate_batch_two_processes_write_the_same_pngs_and_a_rerun_does_nothing(small_checkpoint, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    assert cli_main(["generate-batch", str(prompts), "--out", str(alone), "--model", str(small_checkpoint)]) == 1
    result = torchrun("generate-batch", str(prompts), "--out", str(shared), "--model", str(small_checkpoint))
    assert result.returncode == 1, result.stderr[-3000:]  # the empty prompt failed, the others were made
    assert sorted(outputs(alone, ".png")) == ["000002.png", "apple.png", "boat.png"]
    assert outputs(shared, ".png") == outputs(alone, ".png")
    assert summary(shared)["failures"] == [
        {"item": "line 3", "error": "the prompt is empty: describe the image or video to generate"}]
    assert result.stdout.count("3 written, 0 skipped, 1 failed by 2 process(es)") == 1, result.stdout

    again = torchrun("generate-batch", str(prompts), "--out", str(shared), "--model", str(small_checkpoint))
    assert (summary(shared)["written"], summary(shared)["skipped"], summary(shared)["failed"]) == (0, 3, 1)
    assert outputs(shared, ".png") == outputs(alone, ".png"), again.stderr[-3000:]


def test_a_rerun_after_a_partial_run_makes_only_the_missing_files(small_checkpoint, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    arguments = ["generate-batch", str(prompts), "--out", str(out), "--model", str(small_checkpoint)]
    cli_main(arguments)
    first = outputs(out, ".png")
    (out / "apple.png").unlink()  # as if the run had stopped before it
    cli_main(arguments)
    assert outputs(out, ".png") == first
    assert (summary(out)["written"], summary(out)["skipped"]) == (1, 2)
    assert [e["item"] for e in read_log(out / ".vilau-job" / "log-process-0.jsonl") if e["status"] == "written"] == [
        "apple.png", "000002.png", "boat.png", "apple.png"]

    folder = write_images(tmp_path / "images", 3)
    cli_main(["caption", str(folder), "--model", str(small_checkpoint), *CAPTION])
    captions = outputs(folder, ".txt")
    (folder / "img1.txt").unlink()
    cli_main(["caption", str(folder), "--model", str(small_checkpoint), *CAPTION])
    assert outputs(folder, ".txt") == captions
    assert (summary(folder)["written"], summary(folder)["skipped"]) == (1, 2)


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a cat", "sed": 3}', "unknown key(s) sed"),
    ('{"prompt": "a cat", "name": "../x"}', "must be a plain file name"),
    ('{"prompt": "a cat", "seed": -1}', "seed must be a whole number >= 0"),
    ('{"prompt": "a cat", "top_p": 0}', "top_p must be in (0, 1]"),
    ('["a cat"]', "must be a JSON object"),
    ('{"prompt": "a cat"', "not JSON"),
    ('{"prompt": 3}', "the prompt must be text"),
    ('{"prompt": " "}', "the prompt is empty"),
    ('{"name": "x"}', "the prompt is empty"),
])
def test_a_bad_prompt_line_fails_alone_with_its_line_number(tmp_path, line, problem):
    from vilau_backend.jobs.generate_job import PromptLine, read_prompt_lines

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a dog"}\n\n' + line + "\n", encoding="utf-8")
    good, bad = read_prompt_lines(path)
    assert isinstance(good, PromptLine) and (good.name, good.request.seed) == ("000001", 1)
    assert bad[0] == 3 and problem in bad[1], bad
