"""Loaded VILA-U models: one instance per (folder, dtype, device, quantize), registered with ComfyUI's model management.

The model's weights are wrapped in a ModelPatcher, as ComfyUI does for CLIP
vision and VAEs, with their real size (quantized layers at their packed size):
other models can then push it off the GPU when they need the memory, ComfyUI
frees other models first when this one needs room, and every node calls
`ready()` to move it back before use. The backend
reads the model's device from its weights, so it follows such moves.

When the weights do not fit in the GPU's free memory even after ComfyUI freed
what it could, the LLM layers that do not fit stay in CPU memory and stream to the
GPU layer by layer at every step (vilau_backend/memory/placement.py); the patcher then
wraps only the part that lives on the GPU. With device "all GPUs" the LLM's layers
are split over every visible GPU instead.

Instances are cached here, at module level and not on a node: the same options
give the same object for as long as anything holds it (a weak cache). The most
recently used one is also held here, so that switching workflows or running with
ComfyUI's output cache off does not reload 7B weights for every prompt; that hold
ends when ComfyUI unloads the model (the Unload Models button, or another model
needing the memory), so that the RAM goes back once no graph uses the model.
`release()` (the VILA-U Unload Model node, or keep_loaded off after each use)
drops the weights at once; the next use reads them again. A loader's own choices
that do not change the weights (keep_loaded, compile) travel with its output, a
`ModelHandle` on the shared instance.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

DTYPE_CHOICES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# the loader's compile choice -> the `compile` of every run through its handle (None: on CUDA, off on the CPU)
COMPILE_CHOICES = {"auto": None, "on": True, "off": False}
ALL_GPUS = "all GPUs"  # a device choice: the LLM's layers split over every visible GPU
GiB = 2**30


@dataclass(frozen=True)
class ModelKey:
    folder: str  # resolved path of the model folder
    dtype: str  # 'float32', 'bfloat16' or 'float16'
    device: str  # the device it runs on: 'cpu', 'cuda:0', ..., or ALL_GPUS
    quantize: str = "none"  # 'none', 'int8' or '4bit'


class LoadedVilaU:
    """One loaded model, shared by every loader with the same ModelKey: loads the weights when needed
    and can drop them."""

    def __init__(self, key: ModelKey, name: str, target):
        self.key = key
        self.name = name
        self.target = target  # torch.device everything but split LLM layers runs on
        self.model: Any = None  # vilau_backend.model.vila_u.VilaUModel, None while released
        self.patcher: Any = None  # comfy.model_patcher.ModelPatcher around the weights that live on `target`
        self.placement: Any = None  # vilau_backend.memory.placement.Placement when layers stream or are split
        self.status = ""  # where the weights are, for the loader node to show

    def ready(self):
        """The backend model, its weights on the load device (after other models may have moved them)."""
        import comfy.model_management as mm

        with _lock:
            if self.model is None:
                self._load()
                self._fit()
            mm.load_models_gpu([self.patcher], force_full_load=True)
            _last[:] = [self]
            return self.model

    def make_room(self, need: int) -> int | None:
        """The backend's `model.make_room`: ComfyUI unloads other models (never this one) until `need`
        bytes of working memory are free on the target; the bytes free then (None on the CPU)."""
        import comfy.model_management as mm

        if self.target.type == "cpu":
            return None
        ours = [m for m in mm.current_loaded_models if m.model is self.patcher]
        mm.free_memory(need, self.target, keep_loaded=ours)
        return int(mm.get_free_memory(self.target))

    def release(self) -> None:
        """Take the model out of ComfyUI's model management and drop its weights (VRAM and RAM)."""
        import comfy.model_management as mm

        with _lock:
            if self.model is None:
                return
            _unregister(self.patcher)
            if self.placement is not None:
                from ..vilau_backend.memory.placement import remove_placement

                remove_placement(self.model)
            self.model = self.patcher = self.placement = None
            self.status = f"{self.name}: released; the next use loads it again"
            if _last and _last[0] is self:
                _last.clear()
        gc.collect()
        mm.soft_empty_cache()
        from ..vilau_backend.checkpoint.loading import return_freed_memory

        return_freed_memory()
        logging.info("VILA-U: released %s", self.name)

    def _load(self) -> None:
        import comfy.model_management as mm

        from ..vilau_backend.model.vila_u import VilaUModel
        from .model_files import quantized_cache_folder

        # weights rest on ComfyUI's offload device (the CPU, unless --highvram / --gpu-only keeps
        # them on the GPU) and load_models_gpu moves them to the target, as for every core model
        offload = mm.unet_offload_device()
        if self.target.type == "cpu" or offload.type != "cpu" and self.key.device != ALL_GPUS:
            offload = self.target
        logging.info("VILA-U: loading %s from %s (%s, quantize %s, runs on %s)", self.name, self.key.folder,
                     self.key.dtype, self.key.quantize, self.key.device)
        # layers are quantized on the GPU they will run on, and kept quantized in the models folder for the
        # next load of the same choice (vilau_backend/memory/quantized_cache.py)
        self.model = VilaUModel.load(self.key.folder, dtype=self.key.dtype, device=offload, quantize=self.key.quantize,
                                     run_device=self.target, quantized_cache=quantized_cache_folder())
        self.model.make_room = self.make_room  # runs ask ComfyUI for their working memory before allocating

    def _fit(self) -> None:
        """Decide what lives on the GPU(s): everything, or what fits with the rest streamed / split."""
        import comfy.model_management as mm

        size = self.model.weight_bytes()
        self.status = f"{self.name}: {size / GiB:.1f} GiB of weights ({self.key.quantize}) on {self.target}"
        if self.target.type != "cpu":
            budgets = _gpu_budgets(self.key.device, self.target, size)
            if self.key.device == ALL_GPUS or budgets[str(self.target)] < size:
                self._place(budgets)
        if self.placement is None:
            self.patcher = _patcher(self.model.networks, self.target, self.key, size)
        count_step_states(self.patcher, self.model)

    def _place(self, budgets: dict[str, int]) -> None:
        from ..vilau_backend.memory.placement import apply_placement, plan_placement

        self.placement = plan_placement(self.model, budgets, str(self.target))
        resident = apply_placement(self.model, self.placement)
        from ..vilau_backend.memory.weight_quantization import module_bytes

        self.patcher = _patcher(resident, self.target, self.key, module_bytes(resident))
        self.status = f"{self.name}: {self.placement.describe()}"
        if self.placement.streamed:
            self.status += (f". OFFLOADING: {self.placement.streamed} of {len(self.placement.layers)} LLM layers do "
                            "not fit in free VRAM and stream from CPU memory at every step, which is much slower; "
                            "free VRAM or choose quantize int8 / 4bit to keep them all on the GPU")
            logging.warning("VILA-U: %s", self.status)

    def __repr__(self) -> str:
        return f"LoadedVilaU({self.name!r}, {self.key.dtype}, {self.key.quantize}, {self.key.device})"


class ModelHandle:
    """What travels on a VILAU_MODEL socket: one loader's view of a shared LoadedVilaU, with that
    loader's own keep_loaded and compile choices. They live here rather than on the shared model
    because ComfyUI runs a loader only when its inputs change: two loaders of one model, one with
    compile on and one off, each keep their setting whichever of them ran last."""

    def __init__(self, loaded: LoadedVilaU, keep_loaded: bool = True, compile: bool | None = None):
        self.loaded = loaded
        self.keep_loaded = keep_loaded
        self.compile = compile  # passed by the nodes to every run they make through this handle

    def ready(self):
        """The backend model on its load device (shared with the other loaders of these weights)."""
        return self.loaded.ready()

    def release(self) -> None:
        self.loaded.release()

    @property
    def status(self) -> str:
        return self.loaded.status

    @property
    def key(self) -> ModelKey:
        return self.loaded.key

    def __repr__(self) -> str:
        return f"ModelHandle({self.loaded!r}, keep_loaded={self.keep_loaded}, compile={self.compile})"


def compile_notice(handle: ModelHandle) -> str:
    """What the handle's compile choice does differently on its device in this process (no CUDA graphs
    under ComfyUI's cudaMallocAsync allocator, uncompiled without Triton...), for the loader node."""
    from ..vilau_backend.decoding.compile_choice import device_notice

    return device_notice(handle.loaded.target, handle.compile)


def releases_after_use(execute):
    """For a node's `execute(cls, model, ...)`: when the model's loader has keep_loaded off, drop the
    weights once the node is done (also after an error or a cancel)."""

    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        try:
            return execute(cls, *args, **kwargs)
        finally:
            if isinstance(model, ModelHandle) and not model.keep_loaded:
                model.release()

    return run


_lock = threading.RLock()
_alive: weakref.WeakValueDictionary[ModelKey, LoadedVilaU] = weakref.WeakValueDictionary()
_last: list[LoadedVilaU] = []  # the most recently used instance, held until ComfyUI unloads it


def get_model(name: str, folder: Path, dtype: str, device: str, quantize: str = "none",
              keep_loaded: bool = True, compile: bool | None = None) -> ModelHandle:
    """A handle on the cached instance for these options (loading it on first use), with this
    loader's keep_loaded and compile choices."""
    # keyed by what the choices resolve to: 'auto' shares the instance of the device and dtype it picks
    target = load_device(device)
    key = ModelKey(str(Path(folder).resolve()), _dtype(dtype, target), device if device == ALL_GPUS else str(target),
                   quantize)
    with _lock:
        loaded = _alive.get(key)
        if loaded is None:
            loaded = LoadedVilaU(key, name, target)
            _alive[key] = loaded
    loaded.ready()
    return ModelHandle(loaded, keep_loaded, compile)


def _patcher(module, target, key: ModelKey, size: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    from comfy.patcher_extension import CallbacksMP

    offload = mm.unet_offload_device() if target.type != "cpu" else target
    # size given: ComfyUI would measure quantized tensors at their logical size
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=target, offload_device=offload, size=size)
    patcher.add_callback(CallbacksMP.ON_DETACH, partial(_release, key))
    return patcher


def count_step_states(patcher, model) -> None:
    """The compiled steps' KV cache and buffers, kept on the model between runs, count in the model's
    size while held, and go first when ComfyUI asks this model to give back memory: a partial unload
    frees them before any weight moves, and a full unload (ON_DETACH, `_release`) frees them too."""
    weights_size, unload_weights = patcher.model_size, patcher.partially_unload

    def model_size():
        return weights_size() + model.step_state_bytes()

    def partially_unload(device_to, memory_to_free=0, *args, **kwargs):
        held = model.step_state_bytes()
        model.release_step_states()
        if held >= memory_to_free:
            return held
        return held + unload_weights(device_to, memory_to_free - held, *args, **kwargs)

    patcher.model_size, patcher.partially_unload = model_size, partially_unload


def _gpu_budgets(device: str, target, size: int) -> dict[str, int]:
    """Bytes of weights each GPU can take once ComfyUI has unloaded what it can, less working memory."""
    import comfy.model_management as mm
    import torch

    reserve = max(GiB, int(getattr(mm, "minimum_inference_memory", lambda: GiB)()))
    devices = [target] if device != ALL_GPUS else [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    budgets = {}
    for dev in devices:
        mm.free_memory(size + reserve, dev)  # other models go first
        budgets[str(dev)] = max(0, int(mm.get_free_memory(dev)) - reserve)
    return budgets


def _unregister(patcher) -> None:
    """Unload a patcher and remove it from ComfyUI's list of loaded models."""
    import comfy.model_management as mm

    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


def load_device(device: str):
    """The torch device a `device` choice names; 'auto' is ComfyUI's own choice (the CPU under --cpu)."""
    import comfy.model_management as mm
    import torch

    if device == ALL_GPUS:
        return torch.device("cuda", 0)  # the vision tower, depth transformer and decoder run on the first
    return mm.get_torch_device() if device == "auto" else torch.device(device)


def device_choices() -> list[str]:
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.cuda.device_count() > 1:
            choices.append(ALL_GPUS)
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        choices += [f"xpu:{i}" for i in range(torch.xpu.device_count())]
    if torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def _release(key: ModelKey, patcher, unpatch_all: bool) -> None:
    """ModelPatcher ON_DETACH callback: ComfyUI unloaded the model, so stop holding it here.
    Takes no lock: it may run inside get_model, when loading one model unloads another."""
    loaded = _alive.get(key)
    # a late detach (of a patcher already released, or replaced by a reload) concerns no weights held now
    if loaded is None or loaded.model is None or loaded.patcher is not patcher:
        return
    loaded.model.release_step_states()  # the compiled step's KV cache goes with the weights
    if _last and _last[0] is loaded:
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
