"""The compiled-step machinery shared by the image step (position_step.py) and the answer step
(text_step.py): which runs compile, what a compiled step is specialised on (`StepKey`), the
step functions compiled once per process, the states kept on the model for replay, and which
(model, key) pairs have been traced already (for the "compiling…" notice).

A run's compile choice is its own argument: `compile=True/False` forces it, None compiles on
CUDA only; runs whose LLM layers are placed by accelerate hooks always run eager, and so do runs
where this process cannot compile or compiling already failed for the model (compile_choice.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..memory.placement import has_placement
from .compile_choice import CompiledStepFailed, compile_failed, compile_mode, fall_back, say_once
from . import compile_cache

log = logging.getLogger(__name__)

CACHE_BUCKET = 256  # cache lengths are multiples of this: prompts of similar length share one compiled step
# called with no argument before a run whose step must be compiled first (seconds on a GPU, minutes
# on a CPU), and with a notice when compiling failed and the run went on uncompiled
CompileCallback = Callable[..., object]
RECOMPILE_LIMIT = 64  # compiled variants per step function (rows x buckets x models); torch's default is 8


def cache_length(prompt_len: int, positions: int) -> int:
    """L: room for the prompt and every position, rounded up to a multiple of CACHE_BUCKET."""
    return -(-(prompt_len + positions) // CACHE_BUCKET) * CACHE_BUCKET


@dataclass(frozen=True)
class StepKey:
    """What a compiled step is specialised on."""

    rows: int
    length: int
    device: str
    dtype: torch.dtype
    kind: str = "image"  # "image": a grid position (position_step.py); "text": an answer token (text_step.py)


_lock = threading.Lock()
_compiled: dict[tuple, object] = {}  # (step function, device type, CompileMode) -> its torch.compile
_traced: set[tuple] = set()  # (id(model), StepKey) already compiled, for the "compiling" notice


def compile_by_default(device: torch.device) -> bool:
    """Whether `compile=None` compiles: on CUDA, where a 7B step is bound by kernel launches that
    a CUDA graph removes (dev/bench/gpu_check.sh measures it); not on the CPU, where inductor's first
    compile takes minutes (README, Performance, has the measured CPU figures)."""
    return device.type == "cuda"


def resolve_compile(choice: bool | None, device: torch.device, placed: bool = False) -> bool:
    """Whether a run compiles. Never while LLM layers stream from CPU memory or are split over GPUs
    (vilau_backend/memory/placement.py): their accelerate hooks move weights and activations in Python at
    every call, which neither dynamo nor a CUDA graph can capture; those runs are eager. Nor where
    inductor cannot run on the device (compile_choice.py says why, once)."""
    if placed:
        if choice:
            log.warning("VILA-U: the compiled step is off while LLM layers stream from CPU memory or are "
                        "split over GPUs; running eager")
        return False
    wanted = compile_by_default(device) if choice is None else bool(choice)
    if not wanted:
        return False
    mode = compile_mode(device)
    say_once(mode.reason)
    return mode.compiled


def run_compiles(model, choice: bool | None) -> bool:
    """`resolve_compile` for a run on `model` with the run's own `choice`; eager once compiling failed
    for this model (compile_choice.fall_back)."""
    device = next(model.llm.parameters()).device
    if choice is not False and compile_failed(model) is not None:
        return False
    return resolve_compile(choice, device, placed=has_placement(model.llm))


def compiled_step(step, device: torch.device):
    """`step` compiled for this kind of device in the mode this process supports (compile_choice.py),
    once per process; dynamo keeps one graph per StepKey."""
    mode = compile_mode(device)
    with _lock:
        if (step, device.type, mode) not in _compiled:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
            options = mode.compile_options()
            if device.type == "cpu":
                options = {**options, "options": {**options.get("options", {}), **cpu_inductor_options()}}
            _compiled[step, device.type, mode] = torch.compile(step, dynamic=False, **options)
        return _compiled[step, device.type, mode]


class StepCalls:
    """How one run calls its step function `step(model, state, index)`: eager, or compiled with what every
    compiled run needs around it. Before the first call, the "compiling…" notice when (model, key) was
    never traced; after the first step, the pair marked compiled, so that a later run of this size, even
    after a cancel, only replays; when the compiled step raises, the model falls back to eager
    (compile_choice.fall_back: later runs eager, its kept states freed, the notice to `on_compile`), this
    object calls the eager step from then on, and CompiledStepFailed tells the run: the image run starts
    again (a half-done grid step may have overwritten what it read), the answer step runs again (it
    rewrites only what it writes)."""

    def __init__(self, model, key: StepKey, step: Callable, compiled: bool, on_compile: CompileCallback | None):
        self.model, self.key, self.step, self.on_compile = model, key, step, on_compile
        self.compiled, self.traced = compiled, not compiled
        self.function = step
        if compiled:
            if on_compile is not None and needs_compiling(model, key):
                on_compile()
            self.function = compiled_step(step, model.device)

    def __call__(self, model, state, index: torch.Tensor) -> None:
        if not self.compiled:
            return self.step(model, state, index)
        try:
            self.function(model, state, index)
        except Exception as error:  # only the step: the callbacks' errors (a cancel) are raised outside it
            self._fall_back(error)
            raise CompiledStepFailed(error) from error
        if not self.traced:
            mark_compiled(self.model, self.key)
            self.traced = True

    def _fall_back(self, error: Exception) -> None:
        notice = fall_back(self.model, error)
        self.model.release_step_states()  # a failed compiled state is not replayed again
        self.compiled = False
        if self.on_compile is not None:
            self.on_compile(notice)


def cpu_inductor_options() -> dict:
    """Inductor options for CPU steps: scalar code where vector code is known to go wrong with torch 2.14.
    With no vector ISA (a CPU without AVX2, or ATEN_CPU_CAPABILITY=default) inductor's reductions still
    name vector types and fail to build; with ATEN_CPU_CAPABILITY capping the ISA below the CPU's own
    (avx2 on an AVX-512 CPU) its code crashed or gave NaN here. Elsewhere inductor keeps its own choice."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

        picked, best = pick_vec_isa(), valid_vec_isa_list()
    except Exception:  # a torch without this module: leave inductor its own choice
        return {}
    capped = bool(best) and str(picked) != str(best[0])
    return {"cpp.vec_isa_ok": False} if not picked or capped else {}


def step_state(model, key: StepKey, compiled: bool, state_class: type):
    """The `state_class` state for `key`. Compiled steps keep theirs on the model for the next run
    (a CUDA graph replays fixed addresses), one at a time: a run of another size or kind frees
    the previous state. Eager runs allocate their own, freed with the run."""
    if not compiled:
        return state_class(model, key)
    if needs_compiling(model, key):
        compile_cache.load(model, key)  # compiled by an earlier process: its kernels, not a compile
    held = model.step_states
    if key not in held:
        held.clear()  # free the old cache before allocating the new one
        held[key] = state_class(model, key)
    return held[key]


def needs_compiling(model, key: StepKey) -> bool:
    """Whether the next compiled run of this size compiles first (seconds to minutes)."""
    return (id(model), key) not in _traced


def mark_compiled(model, key: StepKey) -> None:
    if needs_compiling(model, key):
        _traced.add((id(model), key))
        compile_cache.save(model, key)  # for the next process on this machine


def step_key(model, rows: int, length: int, kind: str = "image") -> StepKey:
    return StepKey(rows=rows, length=length, device=str(model.device), dtype=model.dtype, kind=kind)
