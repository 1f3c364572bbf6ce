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
so a quantized load never holds the full-precision model.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..errors import InputError

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
        raise InputError(f"unknown quantize choice {quantize!r}; choose one of: none, int8, 4bit")
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
    are in. Layers the active kernels can't take in that scheme keep the compute dtype; `kept` names them."""

    def __init__(self, scheme: str, targets: re.Pattern, dtype: torch.dtype):
        self.scheme, self.targets, self.dtype = scheme, targets, dtype
        self.quantized = 0
        self.kept: list[str] = []

    def __call__(self, name: str, module: nn.Module) -> nn.Module | None:
        if self.scheme == "none" or type(module) is not nn.Linear or not self.targets.match(name):
            return None
        replacement = quantize_linear(module, self.scheme, self.dtype)
        if replacement is None:
            self.kept.append(name)
        else:
            self.quantized += 1
        return replacement


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
    """A loaded nn.Linear (weights on their final device) -> its weight-only quantized equivalent there,
    or None when this machine's kernels can't run that layer quantized."""
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
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", device="meta")
    repacks = device.type == "cpu" and bnb_cpu_repacks(quantized)
    if repacks and not fits_bnb_cpu_tiles(linear):
        return None
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    quantized = quantized.to(device).eval()  # Params4bit packs the weight when it reaches a device
    if repacks:
        # bitsandbytes repacks the weight at its first CPU forward, changing the shared quant state but only
        # the calling module's tensor: a layer streamed from CPU memory (whose stored tensor is put back after
        # each call) would then pair unpacked data with a packed state. One forward now packs it for good.
        with torch.inference_mode():
            quantized(torch.zeros(1, linear.in_features, dtype=dtype, device=device))
    return quantized


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
