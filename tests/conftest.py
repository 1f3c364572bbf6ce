"""Shared fixtures: the golden checkpoint from the original implementation and tiny checkpoints we write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIXTURE = Path(__file__).parent / "fixtures" / "vilau-tiny-256"
GOLDEN_CHECKPOINT = FIXTURE / "checkpoint"
REFERENCE = FIXTURE / "reference"


def reference(name: str) -> dict:
    from safetensors.torch import load_file

    # clone: mmap-loaded tensors can be mis-aligned, which changes fp32 GEMMs at ulp level
    return {k: v.clone() for k, v in load_file(str(REFERENCE / name)).items()}


@pytest.fixture(scope="session")
def golden_fp32():
    from vilau_backend.model import VilaUModel

    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def golden_bf16():
    from vilau_backend.model import VilaUModel

    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="bfloat16", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from vilau_backend.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "vila-u-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from vilau_backend.model import VilaUModel

    return VilaUModel.load(tiny_checkpoint, dtype="float32", device="cpu")
