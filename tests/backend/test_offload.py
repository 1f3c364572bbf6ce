"""Placement of the LLM's decoder layers: streamed from CPU memory when a GPU is too small, split over several GPUs.

The plans are computed with fake memory budgets (accelerate plans for GPUs that need
not exist); running a placed model is tested on the CPU, where streaming goes
through the same hooks (its copies are then CPU to CPU).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vilau_backend.errors import InputError
from vilau_backend.tasks.generate import ImageSampling, generate_codes
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.memory.placement import STREAMED, apply_placement, plan_placement, remove_placement
from vilau_backend.memory.streaming import StreamFromCpu
from vilau_backend.memory.weight_quantization import module_bytes
from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint
from vilau_backend.tasks.understand import GREEDY, describe_images

SIZES = CheckpointSizes(llm_layers=6, llm_hidden=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("offload") / "m", SIZES, seed=5)


@pytest.fixture(scope="module")
def model(checkpoint):
    return VilaUModel.load(checkpoint, dtype="float32", device="cpu")


def _sizes(model) -> tuple[int, int]:
    layer = module_bytes(model.llm.model.layers[0])
    return layer, model.weight_bytes() - module_bytes(model.llm.model.layers)


def test_everything_fits_on_one_gpu(model):
    layer, pinned = _sizes(model)
    plan = plan_placement(model, {"cuda:0": pinned + 10 * layer}, "cuda:0")
    assert plan.layers == ("cuda:0",) * 6 and plan.streamed == 0


def test_layers_that_do_not_fit_are_streamed_and_the_rest_stays(model):
    layer, pinned = _sizes(model)
    plan = plan_placement(model, {"cuda:0": pinned + int(3.5 * layer)}, "cuda:0")
    # accelerate keeps room for the largest layer on the GPU when it streams: 3.5 layers of room -> 2 resident
    assert plan.layers == ("cuda:0",) * 2 + (STREAMED,) * 4, plan
    assert "4 streamed from CPU memory" in plan.describe()


def test_layers_split_over_two_gpus_in_order_without_splitting_a_layer(model):
    layer, pinned = _sizes(model)
    # room for 3.5 layers on the first (less one kept free for a streamed layer, as accelerate plans), 10 on the second
    plan = plan_placement(model, {"cuda:0": pinned + int(3.5 * layer), "cuda:1": 10 * layer}, "cuda:0")
    assert plan.layers == ("cuda:0",) * 2 + ("cuda:1",) * 4, plan
    assert plan.streamed == 0 and plan.devices == ["cuda:0", "cuda:1"]


def test_quantized_layers_are_planned_at_their_stored_size(checkpoint):
    int8 = VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize="int8")
    layer, pinned = _sizes(int8)
    plan = plan_placement(int8, {"cuda:0": pinned + 10 * layer}, "cuda:0")
    assert plan.streamed == 0, plan  # sized as fp32 (4x their stored size) only 2 would fit


def test_a_gpu_too_small_for_the_fixed_parts_says_what_to_do(model):
    _, pinned = _sizes(model)
    with pytest.raises(InputError, match=r"cuda:0 has room for .* GiB.*use quantize int8 or 4bit"):
        plan_placement(model, {"cuda:0": pinned // 2}, "cuda:0")


@pytest.mark.parametrize("quantize", ["none", "int8", "4bit"])
def test_streamed_layers_give_the_same_codes_and_answers(checkpoint, quantize):
    model = VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize=quantize)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    sampling = ImageSampling(top_k=1)
    codes = generate_codes(model, "a red apple", sampling=sampling)
    answer = describe_images(model, image, "what is it?", sampling=GREEDY, max_new_tokens=8)[0].output_ids
    layer, pinned = _sizes(model)
    planned = plan_placement(model, {"cuda:0": pinned + int(3.5 * layer)}, "cuda:0")
    # the same plan with the CPU standing in for the GPU
    plan = replace(planned, main="cpu", layers=tuple("cpu" if d == "cuda:0" else d for d in planned.layers))
    assert plan.streamed == 4
    resident = apply_placement(model, plan)
    assert isinstance(model.llm.model.layers[5]._hf_hook, StreamFromCpu)
    assert "layer_0" in resident and "layer_5" not in resident
    try:
        assert torch.equal(generate_codes(model, "a red apple", sampling=sampling), codes)
        assert describe_images(model, image, "what is it?", sampling=GREEDY, max_new_tokens=8)[0].output_ids == answer
    finally:
        remove_placement(model)
    assert not hasattr(model.llm.model.layers[5], "_hf_hook")
    assert torch.equal(generate_codes(model, "a red apple", sampling=sampling), codes)
