"""safetensors -> modules, with errors that name the file and the tensor, and little memory.

Each tensor is read with plain file reads straight into freshly allocated memory
(`SafetensorsFile`): no memory map, so pages of the checkpoint never count
towards the process's resident memory, and no second copy beyond a dtype
conversion of one tensor at a time. Peak memory while loading is then the
weights as loaded plus the largest single tensor. (safetensors' own `safe_open`
memory-maps whole shards and hands out tensors on those pages; copying them out
left the touched pages of every open shard resident, about 4 GiB extra for the
7B model.)

Weights the model never runs (SigLIP's text tower, its last layer and pooling
head, the quantizer's EMA buffers) are never read. Sharded checkpoints
(`model.safetensors.index.json`) read the same. Modules are built on the meta
device and receive their weights module by module, already in the caller's
dtype and on the caller's device; `convert` may replace a module as soon as its
weights are in (quantization while loading, so the full-precision model never
exists at once), or provide it whole before they are read (quantized weights
from a cache).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from accelerate import init_empty_weights
from torch import nn

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# the safetensors format's dtype names (https://github.com/huggingface/safetensors, format section)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}



class ModuleConvert(Protocol):
    """What `load_weights` asks about each sub-module (by its name inside the module being loaded)."""

    def provide(self, name: str, module: nn.Module, device: torch.device) -> nn.Module | None:
        """Before its weights are read: a replacement that already holds its weights on `device` (then the
        module's own tensors are not read), or None to read them."""

    def __call__(self, name: str, module: nn.Module) -> nn.Module | None:
        """Once its weights are in: a replacement, or None to keep it."""


class SafetensorsFile:
    """One .safetensors file: its header parsed once; tensors read on demand with plain reads."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise self._corrupt(exc) from exc
        try:
            self._entries = self._read_header()
        except (ValueError, KeyError, TypeError, struct.error, OSError) as exc:
            self._file.close()
            raise self._corrupt(exc) from exc

    def _corrupt(self, reason) -> CheckpointError:
        return CheckpointError(f"weight file {self.path} is truncated or corrupt ({reason})",
                               hint="delete it and download the model again")

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        size = os.fstat(self._file.fileno()).st_size
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        raw = self._file.read(header_len)
        self.header_crc32 = zlib.crc32(raw)  # lets a cache check its own files' headers (metadata included)
        header = json.loads(raw)
        self.metadata: dict[str, str] = header.get("__metadata__") or {}
        data_start = 8 + header_len
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
            numel = 1
            for n in shape:
                numel *= n
            if end - begin != numel * dtype.itemsize or data_start + end > size:
                raise ValueError(f"tensor {key!r} lies outside the file or has the wrong length")
            entries[key] = (dtype, shape, data_start + begin, end - begin)
        return entries

    def keys(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> torch.Tensor:
        """The tensor as stored, in new CPU memory."""
        dtype, shape, offset, length = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if length else memoryview(b"")
        self._file.seek(offset)
        done = 0
        while done < length:
            got = self._file.readinto(buffer[done:])
            if not got:
                raise self._corrupt(f"tensor {key!r} ends early")
            done += got
        return tensor

    def close(self) -> None:
        self._file.close()


class SafetensorsFolder:
    """The weights of one sub-folder (llm/, vision_tower/, mm_projector/), single file or sharded."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[Path, SafetensorsFile] = {}
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
            self._key_to_file = {key: self.folder / name for key, name in weight_map.items()}
            for path in sorted(set(self._key_to_file.values())):
                self._open(path)
        elif single.is_file():
            handle = self._open(single)
            self._key_to_file = {key: single for key in handle.keys()}
        else:
            raise CheckpointError(
                f"{self.folder} has neither {SINGLE_NAME} nor {INDEX_NAME}",
                hint="copy the model's weight files into that folder (the download may be incomplete)",
            )

    def _open(self, path: Path) -> SafetensorsFile:
        if not path.is_file():
            self.close()
            raise CheckpointError(f"weight file {path} is missing", hint="the download is incomplete: fetch the model again")
        try:
            self._files[path] = SafetensorsFile(path)
        except CheckpointError:
            self.close()
            raise
        return self._files[path]

    def keys(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file and key in self._files[self._key_to_file[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._key_to_file[key]].shape(key)

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `key` on the CPU, floating point ones converted to `dtype`."""
        tensor = self._files[self._key_to_file[key]].read(key)
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor

    def describe(self, key: str) -> str:
        return str(self._key_to_file.get(key, self.folder))

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module with its parameters on the meta device (no memory, no init).

    Buffers stay real: they are computed at construction (rotary frequencies,
    position ids) and are not in the checkpoint."""
    with init_empty_weights(include_buffers=False):
        return factory()


def load_weights(
    module: nn.Module,
    weights: SafetensorsFolder,
    prefix: str,
    dtype: torch.dtype,
    device: torch.device | str,
    convert: ModuleConvert | None = None,
) -> nn.Module:
    """Give every parameter and persistent buffer of `module` the tensor `prefix + name`, module by module.

    Missing tensors and shape mismatches raise a CheckpointError naming the file
    before anything is read; checkpoint tensors the module does not have are
    ignored on purpose. After a sub-module has its weights, `convert` may return a
    replacement for it (e.g. a quantized Linear), which takes its place at once.
    """
    _check_tensors(module, weights, prefix)
    provided: list[str] = []  # sub-modules that came whole from `convert.provide`: their children are in them
    # by name, not a list of modules: a replaced module (and its full-precision weights) must not stay referenced
    for name in [name for name, _ in module.named_modules()]:
        if any(name.startswith(done + ".") for done in provided):
            continue
        sub = module.get_submodule(name)
        replacement = convert.provide(name, sub, torch.device(device)) if convert is not None and name else None
        if replacement is not None:
            provided.append(name)
        else:
            _read_own_tensors(sub, weights, prefix + (f"{name}." if name else ""), dtype, device)
            replacement = convert(name, sub) if convert is not None and name else None
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, replacement)
            return_freed_memory()  # the full-precision weights and the quantizer's temporaries
    # parameters are already in place; this moves the computed buffers
    return module.to(device).eval().requires_grad_(False)


def _read_own_tensors(sub: nn.Module, weights: SafetensorsFolder, prefix: str, dtype: torch.dtype,
                      device: torch.device | str) -> None:
    """The module's own parameters and persistent buffers (not its children's) from `prefix + name`."""
    own = [(n, t, True) for n, t in sub._parameters.items() if t is not None]
    own += [(n, t, False) for n, t in sub._buffers.items() if t is not None and n not in sub._non_persistent_buffers_set]
    for leaf, current, is_param in own:
        target_dtype = dtype if current.is_floating_point() else current.dtype
        tensor = weights.get(prefix + leaf, target_dtype).to(device)
        if is_param:
            sub._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            sub._buffers[leaf] = tensor


def return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Quantizing frees each layer's full-precision weights and temporaries of other sizes
    than the next allocations; without this the holes stay resident and peak memory grows
    by up to the full-precision model."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _check_tensors(module: nn.Module, weights: SafetensorsFolder, prefix: str) -> None:
    state = module.state_dict(keep_vars=True)
    missing = [prefix + name for name in state if prefix + name not in weights]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"{weights.folder} lacks {len(missing)} tensor(s) the model needs: {shown}",
            hint="the checkpoint is incomplete or from another model; download it again",
        )
    for name, current in state.items():
        key = prefix + name
        found = weights.shape(key)
        if tuple(current.shape) != found:
            raise CheckpointError(
                f"tensor {key!r} in {weights.describe(key)} has shape {list(found)}, expected {list(current.shape)} "
                "from the config files",
                hint="config.json and the weights disagree: the checkpoint is damaged or mixed from two models",
            )
