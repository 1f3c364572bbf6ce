"""Compiled steps kept across processes: the first process on a machine compiles a step, every
later one (the other processes of a job, the next job, ComfyUI after a restart) loads it.

Two of torch's mechanisms, both in the pack's folder:

- inductor's on-disk cache (compiled graphs, and the built kernels: C++ libraries on the CPU,
  Triton binaries on GPUs) lives in ``<folder>/inductor`` instead of a temporary folder that a
  reboot or a new container empties, unless the user chose another (TORCHINDUCTOR_CACHE_DIR). Measured
  on the CPU, this is what makes a later process warm: it still traces the step with dynamo, but
  builds no kernel. Inductor reads its folder from the environment, which is the whole process's,
  so only a process that is the pack's own asks for this (`own_inductor_cache`: the command line
  and its dataset jobs); inside ComfyUI, whose other nodes compile too, inductor keeps its folder.
- `torch.compiler.save_cache_artifacts` once a step size has been compiled, one file per size,
  loaded with `load_cache_artifacts` before the first compiled run of that size in a new
  process: a file that can be copied to another machine (or shared), where it saves inductor's
  graph compilation (the kernels are then built from the loaded code).

One file per (torch version, device, model shapes, step size): a torch, device or model change
looks for another file, so a stale artifact is never loaded (torch checks its own keys too).
The folder is the user's cache folder (``~/.cache/vila-u/compile``, or under XDG_CACHE_HOME),
or what `use_folder` names; nothing is written or read when it is set to None.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: set[Path] = set()  # files loaded into this process's torch caches
_folder: list[Path | None] = [Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vila-u" / "compile"]
_inductor_in_folder = [False]  # own_inductor_cache was called: this process is the pack's own


def use_folder(folder: str | os.PathLike | None) -> Path | None:
    """Keep the compiled artifacts in `folder` (None: neither save nor load them); the folder used until now."""
    previous = _folder[0]
    _folder[0] = None if folder is None else Path(folder)
    return previous


def own_inductor_cache() -> None:
    """Keep inductor's cache in the pack's folder too (see above): for processes that are the pack's own,
    never inside ComfyUI."""
    _inductor_in_folder[0] = True


def cache_file(model, key) -> Path | None:
    """The file of `key`'s compiled step for `model` on this torch and device (None: caching is off)."""
    folder = _folder[0]
    if folder is None:
        return None
    shapes = repr((model.config.llm, model.config.quantizer, str(key), model.weight_quantization))
    digest = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    return folder / f"torch-{torch.__version__}-{_device_tag(model.device)}-{key.kind}-{key.rows}x{key.length}-{digest}.bin"


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
        return f"cuda-{name}-sm{major}{minor}"
    return f"{device.type}-{platform.machine()}"


def load(model, key) -> bool:
    """Before `key` is compiled: load the saved artifacts of `key` into torch's caches (and keep
    inductor's cache in the pack's folder where own_inductor_cache asked for it); whether there were any."""
    path = cache_file(model, key)
    with _lock:
        if path is not None and _inductor_in_folder[0]:
            _own_inductor_folder(path.parent / "inductor")
        if path is None or path in _loaded or not path.is_file():
            return False
        _loaded.add(path)
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as error:  # a damaged or foreign file: compile as if it were not there
            log.warning("VILA-U: could not load the compiled step from %s (%s); compiling it", path, error)
            return False
    return True


def _own_inductor_folder(folder: Path) -> None:
    """Point inductor's cache at `folder` unless someone chose another than torch's temporary default.
    torch reads the variable at each cache access; importing inductor sets it to the default."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def save(model, key) -> Path | None:
    """Save what this process has compiled, as `key`'s file, unless that file exists (it holds the same)."""
    path = cache_file(model, key)
    if path is None or path.exists():
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".saving-")
    except OSError as error:  # a read-only cache folder costs the next process a compile, nothing more
        log.warning("VILA-U: could not save the compiled step in %s (%s)", path.parent, error)
        return None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(saved[0])
        os.replace(temporary, path)  # whole or absent: another process may be loading it
    except OSError as error:  # a full disk: as above
        Path(temporary).unlink(missing_ok=True)
        log.warning("VILA-U: could not save the compiled step to %s (%s)", path, error)
        return None
    with _lock:
        _loaded.add(path)
    return path
