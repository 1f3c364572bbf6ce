"""dev/bench/gpu_check.sh end to end on the CPU (--dry-run: the golden-size preset, torch.cuda stubbed, dynamo's
eager backend), so that a Python error in the check shows here and never spends a lent GPU's time.
Takes about three minutes on two busy cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.no_transformers  # checks a dev script; the 4.50.3 pass leaves it out (tests/conftest.py)

IMAGE_FIGURES = {"allocator", "compile_mode", "b1_eager_ms_per_position", "b1_compiled_ms_per_position",
                 "b1_compile_s", "b1_cudagraph_skips", "b1_eager_peak_vram_gib", "b1_compiled_s_per_image"}


def test_the_gpu_check_dry_run_delivers_every_figure_to_its_json_file(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(REPO / "dev/bench/gpu_check.sh"), sys.executable, "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exit code" not in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(figures) == {"native allocator", "cudaMallocAsync", "tests", "batch 4", "384 px"}, figures
    assert IMAGE_FIGURES <= set(figures["native allocator"]) and IMAGE_FIGURES <= set(figures["cudaMallocAsync"])
    # the pack's choice follows the allocator: CUDA graphs, except under ComfyUI's default cudaMallocAsync
    assert figures["native allocator"]["compile_mode"] == "cuda graphs"
    assert (figures["cudaMallocAsync"]["allocator"], figures["cudaMallocAsync"]["compile_mode"]) == (
        "cudaMallocAsync", "inductor")
    assert figures["native allocator"]["answer_compiled_tokens_per_s"] > 0
    assert "b4_compiled_ms_per_position" in figures["batch 4"] and "b1_compile_s" in figures["384 px"]
    assert " passed" in figures["tests"]["summary"] and "failed" not in figures["tests"]["summary"], figures["tests"]
