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

Quantization happens while loading, one Linear at a time (`linear_converter`),
so a quantized load never holds the full-precision model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError

QUANTIZE_CHOICES = ("none", "int8", "4bit")

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


def linear_converter(scheme: str, targets: re.Pattern, dtype: torch.dtype) -> Callable[[str, nn.Module], nn.Module | None]:
    """For `load_weights(convert=...)`: quantize each Linear whose name matches `targets`, once its weights are in."""

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if scheme == "none" or type(module) is not nn.Linear or not targets.match(name):
            return None
        return quantize_linear(module, scheme, dtype)

    return convert


def quantize_linear(linear: nn.Linear, scheme: str, dtype: torch.dtype) -> nn.Module:
    """A loaded nn.Linear (weights on their final device) -> its weight-only quantized equivalent there."""
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # torchao's default set_inductor_config=True flips process-wide inductor settings (and the fp32
        # matmul precision) for every later compile in ComfyUI: the pack changes no global state
        quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
        return linear
    if scheme == "4bit":
        import bitsandbytes as bnb

        device = linear.weight.device
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return quantized.to(device)  # Params4bit packs the weight when it reaches a device
    raise InputError(f"unknown quantize scheme {scheme!r}")


def quantize_module(module: nn.Module, scheme: str, targets: re.Pattern, dtype: torch.dtype) -> nn.Module:
    """Quantize an already loaded module in place (for models built in memory, e.g. the benchmarks)."""
    convert = linear_converter(check_quantize(scheme), targets, dtype)
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
    """Bytes of all weights and buffers of a module as stored (quantized ones included with their scales)."""
    return sum(tensor_bytes(t) for t in module.state_dict().values())
