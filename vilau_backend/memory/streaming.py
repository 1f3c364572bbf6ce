"""Decoder layers streamed from CPU memory: their weights rest in CPU memory and are copied to the GPU for each call.

On CUDA the copies overlap the computation (docs/ARCHITECTURE.md, "The backend's layers"):
- each streamed layer's CPU tensors are pinned once, when the layer is placed, so that copies from
  them are asynchronous (`non_blocking`) DMA transfers instead of staged, blocking ones;
- while layer i computes on the current stream, layer i+1's weights are copied on a side stream;
  layer i+1's computation waits on an event recorded after its copy, not the CPU;
- each copy is recorded on the stream that computed with it before it is dropped, so that the caching
  allocator does not give its memory to the next copy (on the side stream) while that computation
  may still be reading it.
Anywhere else (no CUDA: the CPU standing in for the GPU in tests, other accelerators) each call copies
plainly, and nothing is pinned: pinning needs a CUDA driver.

Quantized weights are copied as they are stored: a tensor subclass (torchao's int8) through its inner
tensors (`__tensor_flatten__`), a bitsandbytes Params4bit as its packed data and a copy of its
quantization state. The CPU tensors are never modified (bitsandbytes' own `.to` would move the
shared quantization state to the GPU), so nothing is copied back after a call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate.hooks import ModelHook
from accelerate.utils import send_to_device
from torch import nn

Slot = tuple[nn.Module, str]  # where a tensor lives: a module and its name among _parameters or _buffers
Move = Callable[[torch.Tensor], torch.Tensor]  # copies one plain tensor


def rebuilt(tensor: torch.Tensor, move: Move) -> torch.Tensor:
    """`tensor` with each plain tensor it holds replaced by `move(plain)`: the inner tensors of a tensor subclass,
    the data and quantization-state tensors of a bitsandbytes Params4bit; a Parameter stays a Parameter."""
    if getattr(type(tensor), "__tensor_flatten__", None) is not None:
        names, context = tensor.__tensor_flatten__()
        inner = {name: rebuilt(getattr(tensor, name), move) for name in names}
        out = type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())
    elif getattr(tensor, "quant_state", None) is not None:
        out = copy.copy(tensor)  # Params4bit's copy keeps its settings (block size, quant type, module)
        out.data = move(tensor.data)
        out.quant_state = _rebuilt_state(tensor.quant_state, move)
        return out
    else:
        out = move(tensor.detach())
    return nn.Parameter(out, requires_grad=False) if isinstance(tensor, nn.Parameter) else out


def _rebuilt_state(state, move: Move):
    out = copy.copy(state)  # a bitsandbytes QuantState: absmax, code table, offset, nested state2
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(out, name, move(value))
        elif isinstance(value, type(state)):
            setattr(out, name, _rebuilt_state(value, move))
    return out


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors `rebuilt` would move, in its order."""
    found: list[torch.Tensor] = []

    def collect(plain: torch.Tensor) -> torch.Tensor:
        found.append(plain)
        return plain

    rebuilt(tensor, collect)
    return found


@dataclass
class LayerCopies:
    tensors: dict[Slot, torch.Tensor]  # one layer's weights on the execution device
    ready: object = None  # torch.cuda.Event recorded after the copies on the side stream (None: copied in order)
    made: list[torch.Tensor] = field(default_factory=list)  # the plain tensors copied (what the allocator frees)


class LayerStream:
    """The streamed layers of one model, in the order they run, and how their weights reach `device`."""

    def __init__(self, device: str | torch.device, overlap: bool | None = None):
        self.device = torch.device(device)
        # overlap: pinned memory, side stream, events (CUDA only); None decides from the device and the process
        self.overlap = self.device.type == "cuda" and torch.cuda.is_available() if overlap is None else overlap
        self.side = torch.cuda.Stream(device=self.device) if self.overlap else None
        self.hooks: list[StreamFromCpu] = []
        self.ahead: dict[int, LayerCopies] = {}  # copies issued before their layer's call, by position

    def enrol(self, hook: StreamFromCpu) -> int:
        self.hooks.append(hook)
        return len(self.hooks) - 1

    def resting(self, tensor: torch.Tensor) -> torch.Tensor:
        """How a weight rests between calls: pinned where copies overlap, else as it is."""
        return rebuilt(tensor, lambda plain: plain.pin_memory()) if self.overlap else tensor

    def fetch(self, position: int) -> LayerCopies:
        """The weights of the layer at `position`, usable on the current stream; issues the next layer's copy."""
        if position == 0:
            self.ahead.clear()  # a forward begins: drop what an interrupted one had copied ahead
        copies = self.ahead.pop(position, None) or self._copy(position)
        if copies.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(copies.ready)
        if self.overlap and position + 1 < len(self.hooks):
            self.ahead[position + 1] = self._copy(position + 1)
        return copies

    def release(self, copies: LayerCopies) -> None:
        """After a layer's call: its copies may be freed once the work queued on the current stream has read them."""
        if self.overlap:
            stream = torch.cuda.current_stream(self.device)
            for plain in copies.made:
                plain.record_stream(stream)

    def _copy(self, position: int) -> LayerCopies:
        resting = self.hooks[position].resting
        if not self.overlap:  # where the resting weights already are on the device (the CPU), they serve as they are
            return LayerCopies({slot: t if t.device == self.device else rebuilt(t, lambda plain: plain.to(self.device))
                                for slot, t in resting.items()})

        made: list[torch.Tensor] = []

        def move(plain: torch.Tensor) -> torch.Tensor:
            # allocated on the side stream, filled asynchronously from pinned memory
            made.append(torch.empty_like(plain, device=self.device).copy_(plain, non_blocking=True))
            return made[-1]

        with torch.cuda.stream(self.side):
            tensors = {slot: rebuilt(t, move) for slot, t in resting.items()}
            ready = torch.cuda.Event()
            ready.record(self.side)
        return LayerCopies(tensors, ready, made)


class StreamFromCpu(ModelHook):
    """Keeps a decoder layer's weights in CPU memory and runs it on its stream's device with copies of them,
    dropped after the call."""

    def __init__(self, stream: LayerStream):
        self.stream = stream
        self.execution_device = stream.device  # read by placement.layer_devices (the layer's KV cache goes there)
        self.resting: dict[Slot, torch.Tensor] = {}
        self.position = -1
        self.copies: LayerCopies | None = None  # during a call

    def init_hook(self, module: nn.Module) -> nn.Module:
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, tensor in list(store.items()):
                    if tensor is not None:
                        store[name] = self.resting[(sub, name)] = self.stream.resting(tensor)
        self.position = self.stream.enrol(self)
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        self.copies = self.stream.fetch(self.position)
        _install(self.copies.tensors)
        return send_to_device(args, self.stream.device), send_to_device(kwargs, self.stream.device)

    def post_forward(self, module: nn.Module, output):
        _install(self.resting)
        self.stream.release(self.copies)
        self.copies = None
        return output


def _install(tensors: dict[Slot, torch.Tensor]) -> None:
    for (sub, name), tensor in tensors.items():
        store = sub._parameters if name in sub._parameters else sub._buffers
        store[name] = tensor
