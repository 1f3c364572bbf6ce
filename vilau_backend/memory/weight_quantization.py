"""Weight-only quantization of the LLM and the depth transformer: int8 (torchao) and 4-bit NF4 (bitsandbytes).

Which layers: every Linear inside the LLM's decoder layers, and the depth
transformer's blocks and classifier; together they are 95% of the 7B model's
weights. The vision tower, decoder, projector, embeddings and the LLM's text
head keep the compute dtype (they are small, and the pixels and the first
answer tokens depend on them most directly).

Which libraries, chosen by measurement (figures in README.md, "Memory: quantization, offloading, several GPUs"):
- int8: torchao's `Int8WeightOnlyConfig` (per-channel scales). It runs on the CPU
  and on CUDA with the same kernels-free code, composes with `torch.compile`
  (inductor fuses the dequantisation into the matmul), survives module moves and
  accelerate's offload hooks, and has no dependency on a particular torch build.
- 4-bit: bitsandbytes NF4 (blocks of 64, double-quantised scales), which packs two
  weights per byte on the CPU and on CUDA (torchao's generic 4-bit stores one
  weight per byte outside its CUDA kernels, so it saves nothing over int8 there),
  is what many ComfyUI installs already have, and has CUDA kernels for batch-1
  decoding.
optimum-quanto was measured too and not taken: it compiles C++ extensions with
ninja at first use (which fails without a compiler, as on ComfyUI's Windows
portable build) and has had no release since March 2025.

Quantization happens while loading, one Linear at a time (`LinearConverter`),
so a quantized load never holds the full-precision model; on the GPU the model will
run on when there is one. The quantized layers are kept on disk for the next load
of the same choice (quantized_cache.py), in the libraries' own serialised forms.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .quantized_cache import FORMAT as CACHE_FORMAT
from .quantized_cache import CacheCorrupt, QuantizedCache, checkpoint_fingerprint, entry_name, resolve_folder

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8", "4bit")
NF4_BLOCK = 64  # inputs per NF4 scale (bitsandbytes' default blocksize, which quantize_linear uses)
BNB_CPU_TILE_ROWS = 32  # output rows per tile of bitsandbytes' repacked CPU layout

# module names inside the LLM / the depth transformer whose Linears are quantized
LLM_TARGETS = re.compile(r"model\.layers\.\d+\.")
DEPTH_TARGETS = re.compile(r"head_transformer\.|classifier_mlp\.linear$")

_INSTALL = {"int8": ("torchao", "torchao"), "4bit": ("bitsandbytes", "bitsandbytes>=0.49")}


def check_quantize(quantize: str | None) -> str:
    """A quantize choice -> 'none', 'int8' or '4bit'; raises an InputError naming what to install when its
    library is missing, before any weight is read."""
    scheme = "none" if quantize in (None, "", "none") else str(quantize).replace("-", "")
    if scheme not in QUANTIZE_CHOICES:
        raise InputError(f"unknown quantize choice {quantize!r}; choose one of: {', '.join(QUANTIZE_CHOICES)}")
    if scheme != "none":
        _library(scheme)
    return scheme


def _library(scheme: str):
    module, requirement = _INSTALL[scheme]
    try:
        return __import__(module)
    except Exception as exc:  # ImportError, or a library built for another torch failing at import
        raise InputError(
            f"quantize '{scheme}' needs the Python package {module}, which cannot be imported here ({exc}); "
            f"install it into ComfyUI's Python with: pip install \"{requirement}\" (or choose quantize 'none')"
        ) from exc


class LinearConverter:
    """For `load_weights(convert=...)`: quantizes each Linear whose name matches `targets`, once its weights
    are in. Layers the active kernels can't take in that scheme keep the compute dtype; `kept` names them.

    `run_device` is where the model will run when that is not where its weights are loaded (ComfyUI loads
    onto its offload device, the CPU, and moves the model to the GPU before each use): each layer is moved
    there, quantized there (on a GPU, in a fraction of the CPU's time) and moved back, so at most one
    layer's full-precision weight is on the GPU at a time; which layers stay unquantized, and bitsandbytes'
    CPU repacking, follow the device the layers run on too. With a `cache` (quantized_cache.py), layers
    come from it when it holds them (`provide`), and are written to it when they are quantized here."""

    def __init__(self, scheme: str, targets: re.Pattern, dtype: torch.dtype, run_device: torch.device | None = None,
                 cache: QuantizedCache | None = None, part: str = "llm"):
        self.scheme, self.targets, self.dtype = scheme, targets, dtype
        self.run_device = None if run_device is None else torch.device(run_device)
        self.cache, self.part = cache, part  # `part` prefixes the layer names in the cache (llm / depth)
        self.quantized = 0
        self.kept: list[str] = []

    def _targeted(self, name: str, module: nn.Module) -> bool:
        return self.scheme != "none" and type(module) is nn.Linear and self.targets.match(name) is not None

    def provide(self, name: str, module: nn.Module, device: torch.device) -> nn.Module | None:
        """Before the layer's weights are read: its quantized form from the cache, on `device`."""
        if self.cache is None or not self.cache.reading or not self._targeted(name, module):
            return None
        found = self.cache.layer(f"{self.part}.{name}")
        if found is None:
            return None
        layer = layer_from_tensors(module, self.scheme, self.dtype, f"{self.part}.{name}", *found).to(device)
        self.quantized += 1
        return ready_to_run(layer, self.run_device or device, self.dtype)

    def __call__(self, name: str, module: nn.Module) -> nn.Module | None:
        if not self._targeted(name, module):
            return None
        key = f"{self.part}.{name}"
        if self.cache is not None and self.cache.reading:
            if not self.cache.kept(key):
                raise CacheCorrupt(f"{self.cache.entry} lacks the quantized layer {key}")
            self.kept.append(name)  # the entry's load kept it: so does this one, without asking the kernels
            return None
        stored_on = module.weight.device
        replacement = quantize_linear(module.to(self.run_device or stored_on), self.scheme, self.dtype)
        if replacement is None:
            module.to(stored_on)
            self.kept.append(name)
            if self.cache is not None:
                self.cache.keep(key)
            return None
        replacement = replacement.to(stored_on)
        if self.cache is not None:  # the canonical form: before bitsandbytes' CPU repacking
            try:
                tensors, metadata = layer_tensors(replacement, self.scheme, key)
            except (ImportError, ValueError, TypeError, AttributeError) as error:  # a release without it
                self.cache.stop_writing(f"this {_INSTALL[self.scheme][0]} cannot serialise its layers: {error}")
            else:
                self.cache.add(f"{self.part}.{self.targets.match(name).group(0)}", key, tensors, metadata)
        self.quantized += 1
        return ready_to_run(replacement, self.run_device or stored_on, self.dtype)


def open_quantized_cache(folder: str | os.PathLike | None, model_folder: Path, weight_folders: list[Path],
                         scheme: str, dtype: torch.dtype, run_device: torch.device) -> QuantizedCache | None:
    """The on-disk copy of this model's quantized layers for this choice (quantized_cache.py says how it is
    keyed), or None: no quantization, no folder (`folder` None), or a checkpoint whose files can't be read
    (the load then says what is wrong with them)."""
    root = resolve_folder(folder)
    if scheme == "none" or root is None:
        return None
    library, _ = _INSTALL[scheme]
    tag = runs_on(scheme, run_device)
    try:
        key = {"format": CACHE_FORMAT, "scheme": scheme, "dtype": str(dtype), "runs_on": tag,
               "libraries": {"torch": torch.__version__, library: _library(scheme).__version__},
               "targets": {"llm": LLM_TARGETS.pattern, "depth": DEPTH_TARGETS.pattern},
               "checkpoint": checkpoint_fingerprint(Path(model_folder), weight_folders)}
    except OSError:
        return None
    return QuantizedCache.open(root, entry_name(model_folder, scheme, dtype, tag), key)


def log_kept_layers(scheme: str, dtype: torch.dtype, *converters: LinearConverter) -> None:
    """One log line when some targeted Linears could not be quantized on this machine."""
    kept = [name for c in converters for name in c.kept]
    if kept:
        total = len(kept) + sum(c.quantized for c in converters)
        log.warning(
            "quantize %s: %d of %d layers keep %s, since bitsandbytes' AVX512-BF16 CPU kernel needs "
            "out_features divisible by %d and in_features by %d (e.g. %s)",
            scheme, len(kept), total, str(dtype).removeprefix("torch."), BNB_CPU_TILE_ROWS, NF4_BLOCK, kept[0],
        )


def quantize_linear(linear: nn.Linear, scheme: str, dtype: torch.dtype) -> nn.Module | None:
    """A loaded nn.Linear -> its weight-only quantized equivalent on the same device, in the libraries'
    canonical layout (`ready_to_run` then prepares it for the device it runs on), or None when the kernels
    of that device can't run that layer quantized."""
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # torchao's default set_inductor_config=True flips process-wide inductor settings (and the fp32
        # matmul precision) for every later compile in ComfyUI: the pack changes no global state
        quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
        return linear
    if scheme == "4bit":
        return _nf4_linear(linear, dtype)
    raise InputError(f"unknown quantize scheme {scheme!r}")


def _nf4_linear(linear: nn.Linear, dtype: torch.dtype) -> nn.Module | None:
    import bitsandbytes as bnb

    device = linear.weight.device
    quantized = _empty_linear4bit(linear, dtype)
    if device.type == "cpu" and bnb_cpu_repacks(quantized) and not fits_bnb_cpu_tiles(linear):
        return None
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized.to(device).eval()  # Params4bit packs the weight when it reaches a device


def _empty_linear4bit(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             compute_dtype=dtype, quant_type="nf4", device="meta")


def ready_to_run(layer: nn.Module, run_device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A quantized layer in canonical layout, prepared for the device it runs on."""
    if type(layer).__name__ == "Linear4bit" and run_device.type == "cpu" and bnb_cpu_repacks(layer):
        # bitsandbytes repacks the weight at its first CPU forward, changing the shared quant state but only
        # the calling module's tensor: a layer streamed from CPU memory (whose stored tensor is put back after
        # each call) would then pair unpacked data with a packed state. One forward now packs it for good.
        with torch.inference_mode():
            layer(torch.zeros(1, layer.in_features, dtype=dtype, device=layer.weight.device))
    return layer


def runs_on(scheme: str, run_device: torch.device) -> str:
    """What a quantized layer's stored form depends on beyond the scheme: the device type, and on the CPU
    for 4-bit whether bitsandbytes takes its fused kernel (which decides the layers kept unquantized)."""
    if scheme == "4bit" and run_device.type == "cpu":
        import bitsandbytes as bnb

        probe = bnb.nn.Linear4bit(NF4_BLOCK, BNB_CPU_TILE_ROWS, bias=False, quant_type="nf4", device="meta")
        return "cpu-avx512bf16" if bnb_cpu_repacks(probe) else "cpu"
    return run_device.type


# ---- the libraries' own serialised forms, for the on-disk copy (quantized_cache.py) ------------------------


def layer_tensors(layer: nn.Module, scheme: str, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A quantized layer (canonical layout) -> (plain tensors keyed under `name`, metadata) for safetensors:
    torchao's own flattening of its tensor subclass for int8; bitsandbytes' state_dict (packed weight, its
    quant state packed by `QuantState.as_dict(packed=True)`) for 4-bit."""
    state = {f"{name}.{key}": value for key, value in layer.state_dict().items()}
    if scheme == "int8":
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        return flatten_tensor_state_dict(state)
    return state, {}


def layer_from_tensors(linear: nn.Linear, scheme: str, dtype: torch.dtype, name: str,
                       tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> nn.Module:
    """The inverse of `layer_tensors`: the quantized layer that replaces `linear` (an empty nn.Linear of
    the model), in canonical layout, on the CPU."""
    if scheme == "int8":
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        state, _ = unflatten_tensor_state_dict(tensors, metadata)
        layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = nn.Parameter(state[f"{name}.weight"], requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(state[f"{name}.bias"], requires_grad=False)
        return layer.eval()
    import bitsandbytes as bnb

    layer = _empty_linear4bit(linear, dtype)
    prefix = f"{name}.weight."
    stats = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    layer.weight = bnb.nn.Params4bit.from_prequantized(tensors[f"{name}.weight"], stats, device="cpu", module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(tensors[f"{name}.bias"], requires_grad=False)
    return layer.eval()


def bnb_cpu_repacks(layer: nn.Module) -> bool:
    """Whether bitsandbytes will run this Linear4bit through its fused CPU kernel, which repacks the weight
    at the first forward on the CPU. bitsandbytes decides per layer when it builds one, from the CPU
    (AVX512-BF16: Sapphire Rapids, Zen 4 and newer); releases without that kernel have no such flag."""
    flag = getattr(layer, "support_avx512bf16_for_cpu", None)
    if flag is None:
        try:
            from bitsandbytes.functional import has_avx512bf16
        except ImportError:
            return False
        flag = has_avx512bf16()
    return bool(flag)


def fits_bnb_cpu_tiles(linear: nn.Linear) -> bool:
    """The repacked layout holds tiles of 32 output rows and one scale per 64-input block; other shapes
    fail inside bitsandbytes (real checkpoints' layers are multiples of 64, small test models' need not be)."""
    return linear.out_features % BNB_CPU_TILE_ROWS == 0 and linear.in_features % NF4_BLOCK == 0


def quantize_module(module: nn.Module, scheme: str, targets: re.Pattern, dtype: torch.dtype) -> nn.Module:
    """Quantize an already loaded module in place (for models built in memory, e.g. the benchmarks)."""
    convert = LinearConverter(check_quantize(scheme), targets, dtype)
    for name in [name for name, _ in module.named_modules()]:
        sub = module.get_submodule(name)
        replacement = convert(name, sub)
        if replacement is not None and replacement is not sub:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, replacement)
    return module


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: the packed data and scales of a quantized tensor subclass,
    not its logical shape times the element size (which is what `nelement() * element_size()` says)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.nelement() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of all weights and buffers (non-persistent ones too) of a module as stored, quantized ones with their scales.

    Read from the tensors themselves, not from state_dict(): for a 4-bit layer repacked for bitsandbytes'
    CPU kernel, state_dict() unpacks the weight again as a side effect."""
    total = sum(tensor_bytes(t) for t in module.parameters()) + sum(tensor_bytes(t) for t in module.buffers())
    for sub in module.modules():
        state = getattr(getattr(sub, "weight", None), "quant_state", None)  # bitsandbytes' scales and code table
        if state is not None:
            total += sum(tensor_bytes(t) for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor))
    return total
