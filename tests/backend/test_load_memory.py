"""Loading reads the weights without extra copies, and quantizes layer by layer: peak memory stays near the
weights as loaded (the CI-sized version of dev/bench/load.py, which runs the same measurement at 7B size).

Each load runs in a fresh process that first loads a small random model (imports and lazy
initialisations done), then the ~150 MB bf16 checkpoint below; what the load adds to the
resident memory beyond the weights it keeps is the figure. Measured here: 10 to 30 MiB for
every choice. Reading through memory maps added the whole checkpoint (every page read
stays resident while the file is open); quantizing after a full-precision load would
add the bf16 weights (150 MB) to an int8 or 4-bit load. A quantized load also writes its
quantized copy (one decoder layer at a time), and a second one reads it.
"""

from __future__ import annotations

import pytest

from dev.bench.load import run_child
from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

MiB = 2**20
# the largest tensor is 2816 x 1024 bf16 (5.5 MiB); a load may hold a few of them at once
# (read, converted, quantized, with the quantizer's float32 temporaries): 96 MiB of slack
SLACK = 96 * MiB


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_memory")
    sizes = CheckpointSizes(llm_hidden=1024, llm_layers=6, llm_intermediate=2816, llm_shards=3)
    return write_random_checkpoint(root / "model", sizes), write_random_checkpoint(root / "warmup")


class Options:
    def __init__(self, model: str):
        self.model, self.dtype, self.device = model, "bfloat16", "cpu"


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The quantized cache of these loads: a quantized load also writes its copy, one decoder layer at a time."""
    return tmp_path_factory.mktemp("quantized")


def check_added(r: dict, quantize: str) -> None:
    added = r["peak_rss"] - r["baseline"] - r["weights"]
    assert r["weights"] > (40 if quantize == "4bit" else 70) * MiB, r  # the model is large enough to tell
    assert added < SLACK, f"loading added {added / MiB:.0f} MiB beyond {r['weights'] / MiB:.0f} MiB of weights: {r}"


@pytest.mark.parametrize("quantize", ["none", "int8", "4bit"])
def test_peak_memory_while_loading_is_the_weights_plus_little(checkpoints, copies, quantize):
    model, warmup = checkpoints
    check_added(run_child(Options(str(model)), quantize, warmup, str(copies)), quantize)


@pytest.mark.parametrize("quantize", ["int8", "4bit"])
def test_a_load_from_the_quantized_copy_adds_as_little(checkpoints, copies, quantize):
    model, warmup = checkpoints

    def manifests():
        return {p: p.stat().st_mtime_ns for p in copies.glob(f"model-*-{quantize}-*/manifest.json")}

    if not manifests():  # the test above did not run first
        run_child(Options(str(model)), quantize, warmup, str(copies))
    written = manifests()
    assert len(written) == 1, written
    check_added(run_child(Options(str(model)), quantize, warmup, str(copies)), quantize)
    assert manifests() == written  # read, not written again
