"""Shared fixtures: the golden checkpoint from the original implementation and tiny checkpoints we write.

Markers: `comfyui` marks the tests that start the pinned ComfyUI (or install into its
environment). dev/scripts/run_tests.sh runs every other test again under transformers 4.50.3,
so a new backend test file joins that pass without being listed anywhere.

`--device cuda` (or VILAU_TEST_DEVICE=cuda) loads the fixtures' models on that device instead of
the CPU (dev/bench/gpu_check.sh runs the backend tests so). Tests that build their own modules stay
on the CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIXTURE = Path(__file__).parent / "fixtures" / "vilau-tiny-256"
GOLDEN_CHECKPOINT = FIXTURE / "checkpoint"
REFERENCE = FIXTURE / "reference"
FRAMES_DIR = REFERENCE / "inputs" / "video_frames"  # the 12 frames of the recorded video runs


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "comfyui: starts the pinned ComfyUI or installs into its environment (not in the transformers 4.50.3 pass)"
    )


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=os.environ.get("VILAU_TEST_DEVICE", "cpu"),
        help="device of the test models: cpu (default), cuda, cuda:1, ...",
    )


@pytest.fixture(scope="session", autouse=True)
def compile_cache_folder(tmp_path_factory):
    """Compiled steps saved beside pytest's temporary folders, not in the user's cache: kept from one
    test session to the next on a machine, as a user's are from one process to the next."""
    from vilau_backend.decoding import compile_cache

    previous = compile_cache.use_folder(tmp_path_factory.getbasetemp().parent / "vilau-compile-cache")
    yield
    compile_cache.use_folder(previous)


@pytest.fixture(scope="session")
def model_device(request) -> str:
    return request.config.getoption("--device")


def reference(name: str) -> dict:
    from safetensors.torch import load_file

    # clone: mmap-loaded tensors can be mis-aligned, which changes fp32 GEMMs at ulp level
    return {k: v.clone() for k, v in load_file(str(REFERENCE / name)).items()}


def recorded(name: str) -> dict:
    """A JSON record of the original's run, `reference/<name>.json`."""
    return json.loads((REFERENCE / f"{name}.json").read_text(encoding="utf-8"))


def load_photo(name: str) -> torch.Tensor:
    """A PNG as ComfyUI's LoadImage gives it: (1, H, W, 3) float32 k/255."""
    array = np.asarray(Image.open(REFERENCE / "inputs" / f"{name}.png").convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


@pytest.fixture(scope="session")
def golden_fp32(model_device):
    from vilau_backend.model.vila_u import VilaUModel

    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device=model_device)


@pytest.fixture(scope="session")
def golden_bf16(model_device):
    from vilau_backend.model.vila_u import VilaUModel

    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="bfloat16", device=model_device)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from vilau_backend.testing.random_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "vila-u-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint, model_device):
    from vilau_backend.model.vila_u import VilaUModel

    return VilaUModel.load(tiny_checkpoint, dtype="float32", device=model_device)


def pack_module(name: str):
    """A module of the pack's nodes/ package without running nodes/__init__.py (which needs
    ComfyUI): the repository is registered as the package `vilau_pack`, as ComfyUI registers a pack."""
    import importlib
    import types

    for package, path in (("vilau_pack", REPO), ("vilau_pack.nodes", REPO / "nodes")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(path)]
            sys.modules[package] = module
    return importlib.import_module(f"vilau_pack.nodes.{name}")


def smallest_top2_gap(model, prompts, outputs: list[list[int]]) -> float:
    """The smallest logit gap between the two best tokens at any step of the eager loop that gave
    `outputs` (teacher-forced; a stopped row is fed its EOS, as generate_texts does)."""
    from vilau_backend.model.llm import new_dynamic_cache
    from vilau_backend.decoding.answer_loop import PromptBatch

    batch = PromptBatch(prompts)
    cache = new_dynamic_cache(model.llm)
    gaps = []
    with torch.inference_mode():
        logits = batch.prefill(model.llm, cache)  # (B, V)
        for step in range(max(len(o) for o in outputs)):
            top2 = logits.topk(2, dim=-1).values  # (B, 2)
            gaps += [float(top2[b, 0] - top2[b, 1]) for b, o in enumerate(outputs) if step < len(o)]
            tokens = torch.tensor([o[min(step, len(o) - 1)] for o in outputs])
            logits = batch.decode_step(model.llm, tokens, step, cache)
    return min(gaps)
