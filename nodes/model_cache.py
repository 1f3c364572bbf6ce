"""Loaded VILA-U models: one instance per (folder, dtype, device), registered with ComfyUI's model management.

The model's weights (`VilaUModel.networks`, one plain nn.ModuleDict) are wrapped in
a ModelPatcher, as ComfyUI does for CLIP vision and VAEs: other models can then
push it off the GPU when they need the memory, and every node calls
`LoadedVilaU.ready()` to move it back before use. The backend reads the model's
device from its weights, so it follows such moves.

Instances are cached here, at module level and not on a node: the same options
give the same object for as long as anything holds it (a weak cache). The most
recently used one is also held here, so that switching workflows or running with
ComfyUI's output cache off does not reload 7B weights for every prompt; that hold
ends when ComfyUI unloads the model (the Unload Models button, or another model
needing the memory), so that the RAM goes back once no graph uses the model.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

DTYPE_CHOICES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class ModelKey:
    folder: str  # resolved path of the model folder
    dtype: str  # 'float32', 'bfloat16' or 'float16'
    device: str  # the device it runs on: 'cpu', 'cuda:0', ...


class LoadedVilaU:
    """What travels on a VILAU_MODEL socket."""

    def __init__(self, key: ModelKey, name: str, model: Any, patcher: Any):
        self.key = key
        self.name = name
        self.model = model  # vilau_backend.model.VilaUModel
        self.patcher = patcher  # comfy.model_patcher.ModelPatcher around model.networks

    def ready(self):
        """The backend model, its weights on the load device (after other models may have moved them)."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], force_full_load=True)
        _last[:] = [self]
        return self.model

    def __repr__(self) -> str:
        return f"LoadedVilaU({self.name!r}, {self.model.dtype}, {self.patcher.load_device})"


_lock = threading.Lock()
_alive: weakref.WeakValueDictionary[ModelKey, LoadedVilaU] = weakref.WeakValueDictionary()
_last: list[LoadedVilaU] = []  # the most recently used instance, held until ComfyUI unloads it


def get_model(name: str, folder: Path, dtype: str, device: str) -> LoadedVilaU:
    """The cached instance for these options, loading it on first use."""
    # keyed by what the choices resolve to: 'auto' shares the instance of the device and dtype it picks
    target = load_device(device)
    key = ModelKey(str(Path(folder).resolve()), _dtype(dtype, target), str(target))
    with _lock:
        loaded = _alive.get(key)
        if loaded is None:
            loaded = _load(key, name, target)
            _alive[key] = loaded
    loaded.ready()
    return loaded


def load_device(device: str):
    """The torch device a `device` choice names; 'auto' is ComfyUI's own choice (the CPU under --cpu)."""
    import comfy.model_management as mm
    import torch

    return mm.get_torch_device() if device == "auto" else torch.device(device)


def device_choices() -> list[str]:
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        choices += [f"xpu:{i}" for i in range(torch.xpu.device_count())]
    if torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def _load(key: ModelKey, name: str, target) -> LoadedVilaU:
    import comfy.model_management as mm
    import comfy.model_patcher
    from comfy.patcher_extension import CallbacksMP

    from ..vilau_backend.model import VilaUModel

    # weights rest on ComfyUI's offload device (the CPU, unless --highvram / --gpu-only keeps
    # them on the GPU) and load_models_gpu moves them to the target, as for every core model
    offload = mm.unet_offload_device()
    if target.type == "cpu" or offload.type != "cpu":
        offload = target
    logging.info("VILA-U: loading %s from %s (%s, runs on %s)", name, key.folder, key.dtype, target)
    model = VilaUModel.load(key.folder, dtype=key.dtype, device=offload)
    patcher = comfy.model_patcher.ModelPatcher(model.networks, load_device=target, offload_device=offload)
    patcher.add_callback(CallbacksMP.ON_DETACH, partial(_release, key))
    return LoadedVilaU(key, name, model, patcher)


def _release(key: ModelKey, patcher, unpatch_all: bool) -> None:
    """ModelPatcher ON_DETACH callback: ComfyUI unloaded the model, so stop holding it here.
    Takes no lock: it may run inside get_model, when loading one model unloads another."""
    if _last and _last[0].key == key:
        _last.clear()


def _dtype(choice: str, target) -> str:
    """A DTYPE_CHOICES key -> a backend dtype name. 'auto': bf16 where ComfyUI would use it on that
    device, else fp16 where it would, else fp32; always fp32 on the CPU, where bf16 convolutions are slow."""
    import comfy.model_management as mm

    if DTYPE_CHOICES[choice] is not None:
        return DTYPE_CHOICES[choice]
    if target.type == "cpu":
        return "float32"
    if mm.should_use_bf16(target):
        return "bfloat16"
    if mm.should_use_fp16(target):
        return "float16"
    return "float32"
