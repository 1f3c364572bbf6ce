"""`pytest --device canary`: the device tests run on the CPU, with the test models' tensors marked as living on a
device of their own, so that a test which would mix devices under `--device cuda` fails here, without a GPU.

Under `--device cuda` the fixture models (golden_fp32, golden_bf16, small_model) live on the GPU while references,
inputs and the tests' own tensors are on the CPU, and any operation mixing a CUDA tensor with a CPU tensor (other
than a CPU scalar, an index, or a copy) raises. Under the canary every tensor is either

- MODEL: the fixture models' weights and buffers (marked when loaded) and whatever is computed from them or put
  on their device; or
- CPU: anything else: references, inputs, the tests' own tensors, `.cpu()` results, other models.

The model's device is the CPU under another name: a MODEL tensor reports its device as `cpu:0` (plain CPU tensors
say `cpu`), so `model.device`, `x.device` of a MODEL tensor, and everything the backend, transformers or a test
puts there (`.to(model.device)`, `torch.arange(n, device=x.device)`, `x.new_ones(...)`) are MODEL, while `.cpu()`,
`.to("cpu")` and tensors made without a device are CPU, as on a GPU. The computation is the CPU's own.

An operation whose operands include both MODEL and CPU tensors raises `MixedDevices`, as CUDA would; so does
`.numpy()` of a MODEL tensor. CUDA's allowances are kept: 0-dim CPU tensors mix with anything, the indices of
an indexing may be on either side, `copy_` and item assignment cross devices. A move makes a new tensor.
The session runs with torch.compile's stance "force_eager" (tests/conftest.py): dynamo would trace the canary into
the compiled steps' graphs, where its marks do not exist; run eagerly, the steps' own code is checked too.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch.overrides import TorchFunctionMode

ATTRIBUTE = "_vilau_canary_state"
MODEL_DEVICE = torch.device("cpu", 0)  # what MODEL tensors report; torch computes on it as on the CPU
DEVICE_GETTER = torch._C.TensorBase.__dict__["device"]


class State(Enum):
    CPU = 0
    MODEL = 1


class MixedDevices(RuntimeError):
    pass


def state(tensor: torch.Tensor) -> State:
    return tensor.__dict__.get(ATTRIBUTE, State.CPU)


def mark(tensor: torch.Tensor, to: State) -> torch.Tensor:
    if to is State.CPU:
        tensor.__dict__.pop(ATTRIBUTE, None)
    else:
        tensor.__dict__[ATTRIBUTE] = to
    return tensor


def place_model(networks: torch.nn.Module) -> None:
    """Mark a model's weights and buffers as living on the model's device."""
    for tensor in (*networks.parameters(), *networks.buffers()):
        mark(tensor, State.MODEL)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _placement(func, args, kwargs) -> State | None:
    """Where a call that chooses a device puts its result; None for any other call."""
    if func is torch.Tensor.cpu:
        return State.CPU
    if func is torch.Tensor.to:
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            return state(args[1])
        device = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})[0]
    elif "device" in kwargs:
        device = kwargs["device"]
    else:
        return None
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cpu":
        return None  # meta (building empty modules): torch itself keeps it apart
    return State.MODEL if device == MODEL_DEVICE else State.CPU


EXEMPT = {torch.Tensor.copy_, torch.Tensor.__setitem__}  # cross devices on CUDA too
TO_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}


class DeviceCanary(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_device_getter(func):
            return MODEL_DEVICE if state(args[0]) is State.MODEL else func(*args, **kwargs)
        target = _placement(func, args, kwargs)
        if target is not None:
            return _placed(func, args, kwargs, target)
        if func in EXEMPT:
            return func(*args, **kwargs)
        operands = [args[0]] if func is torch.Tensor.__getitem__ else _tensors(args, kwargs)
        result = _joined(func, operands)
        if func in TO_NUMPY and result is State.MODEL:
            raise MixedDevices("numpy() of a tensor on the model's device: move it with .cpu() first")
        out = func(*args, **kwargs)
        if result is State.MODEL:
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor):
                    mark(tensor, result)
        return out


def _is_device_getter(func) -> bool:
    return getattr(func, "__self__", None) is DEVICE_GETTER


def _placed(func, args, kwargs, target: State):
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    out = func(*args, **kwargs)
    if out is source and state(source) is not target:
        out = out.clone()  # a real move makes a new tensor; the source stays where it was
    return mark(out, target)


def _joined(func, operands: list[torch.Tensor]) -> State:
    """The device of an operation's result; raises when its operands mix the model's device and the CPU
    (a 0-dim CPU tensor mixes with anything, as CUDA allows)."""
    model = [t for t in operands if state(t) is State.MODEL]
    if model and any(state(t) is State.CPU and t.dim() > 0 for t in operands):
        described = ", ".join(f"{tuple(t.shape)} {state(t).name}" for t in operands)
        raise MixedDevices(f"{getattr(func, '__name__', func)} mixes tensors on the model's device and on the CPU "
                           f"({described}): move the model's results with .cpu() before comparing")
    return State.MODEL if model else State.CPU
