"""safetensors -> modules, with errors that name the file and the tensor.

Tensors are read lazily per key, so weights the model never runs (SigLIP's text
tower, its last layer and pooling head, the quantizer's EMA buffers) are never
materialised. Sharded checkpoints (`model.safetensors.index.json`) read the same.
Modules are built on the meta device and receive their weights by assignment,
already in the caller's dtype and on the caller's device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from accelerate import init_empty_weights
from torch import nn

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFolder:
    """The weights of one sub-folder (llm/, vision_tower/, mm_projector/), single file or sharded."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.device = str(device)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
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

    def _open(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing", hint="the download is incomplete: fetch the model again")
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device=self.device))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"weight file {path} is truncated or corrupt ({exc})",
                hint="delete it and download the model again",
            ) from exc
        self._handles[path] = handle
        return handle

    def keys(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._key_to_file[key]].get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        path = self._key_to_file[key]
        try:
            tensor = self._handles[path].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {path} ({exc})", hint="the file is corrupt: download it again") from exc
        # clone: mmap-backed tensors can be mis-aligned, which changes fp32 GEMM results at ulp level
        return tensor.to(dtype=dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor.clone()

    def describe(self, key: str) -> str:
        return str(self._key_to_file.get(key, self.folder))

    def close(self) -> None:
        self._stack.close()

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
) -> nn.Module:
    """Give every parameter and persistent buffer of `module` the tensor `prefix + name`.

    Missing tensors and shape mismatches raise a CheckpointError naming the file;
    checkpoint tensors the module does not have are ignored on purpose.
    """
    state = module.state_dict(keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
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
        target_dtype = dtype if current.is_floating_point() else current.dtype
        loaded[name] = weights.get(key, target_dtype).to(device)
    module.load_state_dict(loaded, strict=True, assign=True)
    # parameters are already in place; this moves the computed buffers
    return module.to(device).eval().requires_grad_(False)
