"""`pytest --device canary`: the device tests run on the CPU, with the test models' tensors marked as living on a
device of their own, so that a test which would mix devices under `--device cuda` fails here, without a GPU.

Under `--device cuda` the fixture models (golden_fp32, golden_bf16, tiny_model) live on the GPU while references,
inputs and the tests' own tensors are on the CPU, and any operation mixing a CUDA tensor with a CPU tensor (other
than a CPU scalar, an index, or a copy) raises. The canary gives every tensor one of three states:

- MODEL: the fixture models' weights and buffers (marked when loaded) and everything computed from them;
- CPU: anything else, the default: references, inputs, tensors a test makes, `.cpu()` results, other models;
- PLACED: a tensor that the pack's code (or a library it called, such as transformers) created or moved "to
  the model's device", which on the CPU cannot be told from "to the CPU". It takes the state of the first tensor it is used
  with (MODEL or CPU), as it would have had to be on that tensor's device.

An operation whose operands include both MODEL and CPU tensors raises `MixedDevices`, as CUDA would; so does
`.numpy()` of a MODEL tensor. Tensors move as on a GPU: `.cpu()` and a test's `.to("cpu")` give CPU copies, and
the backend's `.to(model.device)` gives a PLACED copy. CUDA's allowances are kept: 0-dim CPU tensors mix with
anything, indices of an indexing may be on either side, `copy_` and item assignment cross devices.

The rule it enforces for the tests: compare on the CPU, moving model results with `.cpu()` first.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

TESTS = str(Path(__file__).resolve().parent)
HERE = str(Path(__file__).resolve())
REPO = Path(__file__).resolve().parent.parent
PACK = tuple(str(REPO / folder) for folder in ("vilau_backend", "nodes", "dev"))
ATTRIBUTE = "_vilau_canary_state"


class State(Enum):
    CPU = 0
    MODEL = 1
    PLACED = 2


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


def place_model(networks: torch.nn.Module, to: State = State.MODEL) -> None:
    """Mark a model's weights and buffers as living on the test device (MODEL) or on the CPU."""
    for tensor in (*networks.parameters(), *networks.buffers()):
        mark(tensor, to)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _called_from_tests() -> bool:
    """Whether a placement comes from the tests (or a library they called, such as safetensors reading a
    reference) rather than from the pack's code (the backend, or a library it called, such as transformers)."""
    frame = sys._getframe(3)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(TESTS) and name != HERE:
            return True
        if name.startswith(PACK):
            return False
        frame = frame.f_back
    return True


def _placement(func, args, kwargs) -> State | None:
    """Where a placing call puts its result: None when `func` does not choose a device."""
    if func is torch.Tensor.cpu:
        return State.CPU
    if func is torch.Tensor.to:
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            return state(args[1]) if state(args[1]) is not State.PLACED else State.PLACED
        device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
    elif "device" in kwargs:
        device = kwargs["device"]
    else:
        return None
    if device is None:
        return None
    if torch.device(device).type != "cpu":
        raise MixedDevices(f"the canary runs on the CPU; {getattr(func, '__name__', func)} asked for {device}")
    return State.CPU if _called_from_tests() else State.PLACED


EXEMPT = {torch.Tensor.copy_, torch.Tensor.__setitem__}  # cross-device on CUDA too
TO_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}


class DeviceCanary(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _placement(func, args, kwargs)
        if target is not None:
            return self._placed(func, args, kwargs, target)
        if func in EXEMPT:
            return self._written(func, args, kwargs)
        operands = [args[0]] if func is torch.Tensor.__getitem__ else _tensors(args, kwargs)
        result = _joined(func, operands)
        if func in TO_NUMPY and result is State.MODEL:
            raise MixedDevices("numpy() of a tensor on the model's device: move it with .cpu() first")
        out = func(*args, **kwargs)
        if result is not State.CPU:
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor):
                    mark(tensor, result)
        return out

    @staticmethod
    def _placed(func, args, kwargs, target: State):
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and state(source) is State.MODEL and target is State.PLACED:
            target = State.MODEL  # the backend's .to(model.device) of a tensor already there
        out = func(*args, **kwargs)
        if out is source and state(source) is not target:
            out = out.clone()  # a real move makes a new tensor; the source keeps its state
        return mark(out, target)

    @staticmethod
    def _written(func, args, kwargs):
        destination, sources = args[0], [t for t in _tensors(args[1:], kwargs)]
        if state(destination) is State.PLACED and any(state(s) is State.MODEL for s in sources):
            mark(destination, State.MODEL)
        return func(*args, **kwargs)


def _joined(func, operands: list[torch.Tensor]) -> State:
    """The state of an operation's result; raises when its operands mix the model's device and the CPU
    (a 0-dim CPU tensor mixes with anything, as CUDA allows, and says nothing about the others)."""
    states = [state(t) for t in operands]
    on_cpu = any(s is State.CPU and t.dim() > 0 for s, t in zip(states, operands))
    if State.MODEL in states and on_cpu:
        described = ", ".join(f"{tuple(t.shape)} {s.name}" for s, t in zip(states, operands))
        raise MixedDevices(f"{getattr(func, '__name__', func)} mixes tensors on the model's device and on the CPU "
                           f"({described}): move the model's results with .cpu() before comparing")
    resolved = State.MODEL if State.MODEL in states else State.CPU if on_cpu else (
        State.PLACED if State.PLACED in states else State.CPU)
    if resolved is not State.PLACED:
        for s, t in zip(states, operands):
            if s is State.PLACED:
                mark(t, resolved)
    return resolved
