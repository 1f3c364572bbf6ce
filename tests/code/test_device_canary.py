"""The canary of `pytest --device canary` (tests/device_canary.py) fails a mix of devices as CUDA would, and only that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_canary import MODEL_DEVICE, DeviceCanary, MixedDevices, State, mark, state

pytestmark = pytest.mark.no_transformers


def model_tensor(*shape) -> torch.Tensor:
    return mark(torch.ones(*shape), State.MODEL)


def test_a_model_result_compared_with_a_cpu_reference_fails_until_moved_with_cpu():
    reference = torch.full((3,), 2.0)
    with DeviceCanary():
        result = model_tensor(3) * 2
        with pytest.raises(MixedDevices, match="equal mixes"):
            torch.equal(result, reference)
        with pytest.raises(AssertionError, match="'device' do not match"):  # as assert_close says on CUDA
            torch.testing.assert_close(result, reference)
        assert torch.equal(result.cpu(), reference) and torch.equal(result.to("cpu"), reference)
        assert state(result) is State.MODEL, ".cpu() makes a copy; the result stays on the model's device"


def test_the_model_device_is_the_cpu_under_another_name_and_what_is_put_there_is_on_it():
    weight, image = model_tensor(2, 3), torch.ones(4, 3)
    with DeviceCanary():
        assert weight.device == MODEL_DEVICE and image.device == torch.device("cpu")
        with pytest.raises(MixedDevices, match="linear"):
            torch.nn.functional.linear(image, weight)
        placed = image.to(weight.device)
        assert state(torch.nn.functional.linear(placed, weight)) is State.MODEL
        assert state(image) is State.CPU, "a move copies; the test's tensor stays on the CPU"
        assert state(torch.arange(3, device=weight.device)) is State.MODEL
        assert state(weight.new_ones(2)) is State.MODEL and state(torch.zeros_like(weight)) is State.MODEL
        assert state(torch.zeros(3)) is State.CPU and state(torch.zeros(3, device="cpu")) is State.CPU


def test_cuda_allowances_cpu_scalars_indices_copies_and_item_assignment():
    weight = model_tensor(4)
    with DeviceCanary():
        assert state(weight * torch.tensor(2.0)) is State.MODEL
        assert state(weight[torch.tensor([0, 2])]) is State.MODEL
        out = torch.zeros(4)
        out.copy_(weight)
        out[:2] = weight[:2]
        assert state(out) is State.CPU
        assert weight.sum().item() == 4.0 and weight.tolist() == [1.0] * 4
        with pytest.raises(MixedDevices):
            weight.sum() + torch.ones(2)  # a 0-dim tensor on the device does not mix with a CPU tensor


def test_numpy_of_a_model_tensor_fails_as_on_cuda():
    with DeviceCanary():
        with pytest.raises(MixedDevices, match="numpy"):
            model_tensor(2).numpy()
        assert np.asarray(model_tensor(2).cpu()).tolist() == [1.0, 1.0]
