"""The canary of `pytest --device canary` (tests/device_canary.py) fails a mix of devices as CUDA would, and only that.

"Pack code" below is code compiled under a file name inside vilau_backend/, as the backend's own
`.to(model.device)` is; the tests' own calls come from this file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from device_canary import DeviceCanary, MixedDevices, State, mark, state

pytestmark = pytest.mark.no_transformers

_pack: dict = {}
exec(compile("def place(t):\n    return t.to(torch.device('cpu'))\n"
             "def made():\n    return torch.zeros(3, device=torch.device('cpu'))\n",
             str(REPO / "vilau_backend" / "placing.py"), "exec"), {"torch": torch}, _pack)


def model_tensor(*shape) -> torch.Tensor:
    return mark(torch.ones(*shape), State.MODEL)


def test_a_model_result_compared_with_a_cpu_reference_fails_until_moved_with_cpu():
    reference = torch.full((3,), 2.0)
    with DeviceCanary():
        result = model_tensor(3) * 2
        with pytest.raises(MixedDevices, match="equal mixes"):
            torch.equal(result, reference)
        with pytest.raises(RuntimeError) as raised:  # assert_close wraps the canary's error
            torch.testing.assert_close(result, reference)
        assert isinstance(raised.value, MixedDevices) or isinstance(raised.value.__cause__, MixedDevices)
        assert torch.equal(result.cpu(), reference) and torch.equal(result.to("cpu"), reference)
        assert state(result) is State.MODEL, ".cpu() makes a copy; the result stays on the model's device"


def test_a_cpu_input_into_the_models_weights_fails_but_the_packs_placement_of_it_does_not():
    weight, image = model_tensor(2, 3), torch.ones(4, 3)
    with DeviceCanary():
        with pytest.raises(MixedDevices, match="linear"):
            torch.nn.functional.linear(image, weight)
        placed = _pack["place"](image)
        out = torch.nn.functional.linear(placed, weight)
        assert state(out) is State.MODEL and state(placed) is State.MODEL
        assert state(image) is State.CPU, "the pack's .to(device) copied the test's tensor; the test's stays on the CPU"


def test_what_the_pack_places_takes_the_device_of_what_it_meets():
    with DeviceCanary():
        buffer = _pack["made"]()
        assert state(buffer) is State.PLACED
        buffer.add_(model_tensor(3))
        assert state(buffer) is State.MODEL
        with pytest.raises(MixedDevices):
            buffer + torch.ones(3)
        other = _pack["made"]()
        other.add_(torch.ones(3))  # met the CPU first: a CPU tensor from now on
        with pytest.raises(MixedDevices):
            other + model_tensor(3)


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


def test_numpy_of_a_model_tensor_fails_as_on_cuda():
    with DeviceCanary():
        with pytest.raises(MixedDevices, match="numpy"):
            model_tensor(2).numpy()
        assert np.asarray(model_tensor(2).cpu()).tolist() == [1.0, 1.0]
