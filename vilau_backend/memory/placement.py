"""Where the weights live when they do not all fit on one GPU: streamed from CPU memory, or split over GPUs.

A `Placement` decides, for each of the LLM's decoder layers, the device that holds
it: the main device, another GPU, or STREAMED, meaning the layer's weights stay in
CPU memory and are copied to the main device for each call (streaming: slower,
since every step moves those weights over PCIe). Everything else (embeddings,
final norm, text head, vision tower with the depth transformer and decoder,
projector) stays on the main device: those run every step and are small.

Planning is accelerate's `infer_auto_device_map` over the decoder layers (never
splitting one), after the main device's budget has been reduced by what must
stay there. Running uses accelerate's hooks: `AlignDevicesHook` moves a layer's
inputs to the GPU that holds it; `StreamFromCpu` (an accelerate ModelHook,
memory/streaming.py) copies a streamed layer's weights in for the call, on CUDA
from pinned memory while the layer before it computes, and drops the copies
after. (accelerate's own offload hook cannot handle bitsandbytes 4-bit weights:
it rebuilds them from meta tensors without their quantization state.)

Each layer's KV cache lives on the device its layer runs on (vilau_backend/model/llm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import infer_auto_device_map
from torch import nn

from ..errors import InputError
from .streaming import LayerStream, StreamFromCpu
from .weight_quantization import module_bytes

STREAMED = "stream"  # a layer kept in CPU memory and run on the main device
LAYER_CLASS = "LlamaDecoderLayer"


@dataclass(frozen=True)
class Placement:
    main: str  # device of everything but the decoder layers, e.g. 'cuda:0'
    layers: tuple[str, ...]  # per decoder layer: its device, or STREAMED (CPU memory, run on `main`)

    @property
    def streamed(self) -> int:
        return sum(device == STREAMED for device in self.layers)

    @property
    def devices(self) -> list[str]:
        return sorted({d for d in self.layers if d != STREAMED} | {self.main})

    def describe(self) -> str:
        counts = {d: self.layers.count(d) for d in dict.fromkeys(self.layers)}
        parts = [f"{n} on {d}" if d != STREAMED else f"{n} streamed from CPU memory" for d, n in counts.items()]
        return f"LLM layers: {', '.join(parts)}; the rest on {self.main}"


def plan_placement(model, budgets: dict[str, int], main: str) -> Placement:
    """Decide where each decoder layer goes. `budgets`: bytes of weights each GPU may hold ('cuda:0': n, ...),
    in order of use; whatever does not fit is streamed from CPU memory. `main` must be one of them."""
    layers = model.llm.model.layers
    pinned = model.weight_bytes() - module_bytes(layers)
    if budgets.get(main, 0) < pinned:
        raise InputError(
            f"{main} has room for {budgets.get(main, 0) / 2**30:.1f} GiB of weights, but the parts of VILA-U that must "
            f"stay on it (vision tower, embeddings, text head) take {pinned / 2**30:.1f} GiB; free memory on {main} "
            "(close other programs or models), use quantize int8 or 4bit, or run on the CPU"
        )
    max_memory = {_accelerate_key(d): budget - (pinned if d == main else 0) for d, budget in budgets.items()}
    max_memory["cpu"] = 2**62  # anything left is streamed
    device_map = infer_auto_device_map(layers, max_memory=max_memory, no_split_module_classes=[LAYER_CLASS],
                                       special_dtypes=_stored_dtypes(layers))
    return Placement(main=main, layers=tuple(_layer_device(device_map, i) for i in range(len(layers))))


def _accelerate_key(device: str) -> int | str:
    # accelerate names GPUs by index
    parsed = torch.device(device)
    return (parsed.index or 0) if parsed.type in ("cuda", "xpu") else parsed.type


def _layer_device(device_map: dict, index: int) -> str:
    key = next(k for k in (str(index), "") if k in device_map)
    device = device_map[key]
    return f"cuda:{device}" if isinstance(device, int) else STREAMED if device in ("cpu", "disk") else str(device)


def _stored_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    """accelerate sizes a tensor as numel x its dtype's size: give quantized tensor subclasses (torchao int8,
    whose dtype is the logical one) the dtype they are stored in."""
    out = {}
    for name, param in module.named_parameters():
        inner = getattr(param, "qdata", None)
        if inner is not None:
            out[name] = inner.dtype
    return out


def apply_placement(model, placement: Placement, overlap: bool | None = None) -> nn.ModuleDict:
    """Move and hook the model as planned. Returns the modules that live on the main device, for a caller
    that moves them on and off it (ComfyUI's model management); the others stay where they were put.
    `overlap`: copy streamed layers from pinned memory on a side stream while the layer before computes
    (memory/streaming.py); None: where the main device is CUDA."""
    main = torch.device(placement.main)
    stream = LayerStream(main, overlap)
    llm = model.llm
    resident = {"vision": model.vision, "projector": model.projector, "embed_tokens": llm.model.embed_tokens,
                "norm": llm.model.norm, "rotary_emb": llm.model.rotary_emb, "lm_head": llm.lm_head}
    for i, (layer, device) in enumerate(zip(llm.model.layers, placement.layers)):
        if device == STREAMED:
            layer.to("cpu")
            add_hook_to_module(layer, StreamFromCpu(stream))  # pins its weights where copies overlap
        else:
            layer.to(device)
            add_hook_to_module(layer, AlignDevicesHook(execution_device=torch.device(device)))
            if torch.device(device) == main:
                resident[f"layer_{i}"] = layer
    # the final norm may receive the last layer's output from another GPU
    add_hook_to_module(llm.model.norm, AlignDevicesHook(execution_device=main))
    modules = nn.ModuleDict(resident)
    modules.to(main)
    return modules


def remove_placement(model, device: str | torch.device = "cpu") -> None:
    """Undo `apply_placement`: no hooks, every weight on `device` (weights that were streamed stay pinned
    if they stay in CPU memory: the model is released after this, see nodes/model_cache.py)."""
    for layer in model.llm.model.layers:
        remove_hook_from_module(layer)
    remove_hook_from_module(model.llm.model.norm)
    model.networks.to(device)


def has_placement(llm: nn.Module) -> bool:
    """Whether accelerate hooks place the LLM's layers (streamed or split)."""
    return any(hasattr(layer, "_hf_hook") for layer in llm.model.layers)


def layer_devices(llm: nn.Module) -> list[torch.device]:
    """The device each decoder layer runs on (where its KV cache belongs)."""
    devices = []
    for layer in llm.model.layers:
        hook = getattr(layer, "_hf_hook", None)
        devices.append(torch.device(hook.execution_device) if hook is not None else next(layer.parameters()).device)
    return devices
