"""How a compiled step is compiled, from what this process has, and what happens when compiling fails.

The compiled steps (position_step.py, text_step.py) are worth most on CUDA as CUDA graphs
(torch.compile mode "reduce-overhead"), but a ComfyUI user's process often cannot run them:

- ComfyUI switches torch to the `cudaMallocAsync` allocator by default on NVIDIA (its
  `--disable-cuda-malloc` turns that off). CUDA-graph trees check and checkpoint their memory
  pool through allocator functions this backend does not implement, so the first replay would
  raise. There the step is compiled by inductor without CUDA graphs: fused kernels still cut the
  launches of a 7B step severalfold, and the held static buffers are kept all the same.
  dev/bench/gpu_check.sh measures this mode next to eager and CUDA graphs.
- Without Triton (ComfyUI's Windows portable build usually has none) inductor has no GPU
  kernels, and on GPUs of compute capability below 7.0 (Pascal and older) Triton cannot run:
  those runs are eager.
- Anything else that fails while compiling or running a compiled step (a missing C++ compiler,
  out of memory while autotuning, a backend error) makes that run finish eager, with the same
  result an eager run has, and every later run of that model eager (`fall_back`).

Each of these is said once in the log; `device_notice` is the line the loader node shows.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CUDA_GRAPHS = "reduce-overhead"  # torch.compile's mode that records and replays CUDA graphs
MIN_TRITON_CAPABILITY = (7, 0)  # Triton's GPU kernels need Volta or newer


@dataclass(frozen=True)
class CompileMode:
    """How steps on one device are run when a run asks to compile."""

    compiled: bool  # False: eager, whatever the run asked
    cuda_graphs: bool = False  # compiled with CUDA graphs (mode "reduce-overhead") or plain inductor
    reason: str = ""  # why not the fastest way, for the log and the loader node; "" when nothing to say

    def compile_options(self) -> dict:
        """Keyword arguments of torch.compile for this mode."""
        if self.cuda_graphs:
            return {"mode": CUDA_GRAPHS}
        # explicit, so that a process-wide inductor setting cannot turn CUDA graphs back on
        return {"options": {"triton.cudagraphs": False}}


def has_triton() -> bool:
    """Whether the Triton package is importable (as torch sees it)."""
    from torch.utils import _triton

    return bool(_triton.has_triton_package())


def compile_mode(device: torch.device) -> CompileMode:
    """How a step on `device` is compiled in this process: CUDA graphs on CUDA where the allocator
    supports them, inductor alone under cudaMallocAsync and off CUDA, eager where inductor cannot run."""
    if device.type != "cuda":
        return CompileMode(compiled=True)
    if not has_triton():
        return CompileMode(compiled=False, reason=(
            "Triton is not installed (usual for ComfyUI's Windows portable build), so torch.compile has no GPU "
            "kernels: the VILA-U steps run uncompiled (install triton, or triton-windows on Windows, to compile them)"))
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_TRITON_CAPABILITY:
        return CompileMode(compiled=False, reason=(
            f"this GPU's compute capability {capability[0]}.{capability[1]} is below the 7.0 Triton needs: the "
            "VILA-U steps run uncompiled"))
    if torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        return CompileMode(compiled=True, cuda_graphs=False, reason=(
            "the cudaMallocAsync allocator (ComfyUI's default on NVIDIA) does not support CUDA graphs: the VILA-U "
            "steps are compiled without them (start ComfyUI with --disable-cuda-malloc to use CUDA graphs, faster "
            "per step)"))
    return CompileMode(compiled=True, cuda_graphs=True)


_lock = threading.Lock()
_said: set[str] = set()  # notices already logged by this process


def say_once(notice: str) -> None:
    """Log `notice` the first time it comes up in this process."""
    with _lock:
        if not notice or notice in _said:
            return
        _said.add(notice)
    log.warning("VILA-U: %s", notice)


def device_notice(device: torch.device, choice: bool | None) -> str:
    """For the loader node: what a run on `device` with compile `choice` does differently from the
    fastest way, and why ("" when nothing); logged once."""
    if choice is False:
        return ""
    notice = compile_mode(device).reason
    say_once(notice)
    return notice


def compile_failed(model) -> str | None:
    """Why `model`'s compiled steps were turned off in this process (None while they are on)."""
    return model.compile_failure


def fall_back(model, error: BaseException) -> str:
    """Turn `model`'s compiled steps off after `error`; the line to log and show (logged here)."""
    notice = (f"compiling the VILA-U step failed ({type(error).__name__}: {error}); this run finished uncompiled "
              "and later runs of this model run uncompiled (compile off on the loader, or --no-compile on the command "
              "line, skips the attempt)")
    model.compile_failure = notice
    log.warning("VILA-U: %s", notice, exc_info=error)
    return notice


class CompiledStepFailed(Exception):
    """Raised out of a run's step loop when its compiled step failed, so the run starts again eager.
    Only the step call is guarded: errors from the run's callbacks (a cancel) pass unchanged."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error
