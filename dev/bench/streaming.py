"""What streaming LLM layers from CPU memory costs per generation step, and that it changes no code.

    python -m dev.bench.streaming [--preset golden-size medium] [--quantize none int8 4bit] [--device cpu|cuda]
                                  [--streamed N] [--positions 24] [--repeats 3]

Per preset and quantize choice, on a random-weight model built in memory (dev/bench/generate.py):
text-to-image over the first --positions grid positions (greedy, top_k 1), resident, then with the
last --streamed decoder layers (default: half) streamed from CPU memory (memory/placement.py). Prints
ms per position (best of --repeats) for each, the streamed step's extra cost per position and per
streamed layer, the hook's own time per layer call (its copies included, timed without the layer) and
the part of it the CUDA path spends re-making quantized tensors around their copies, and whether the codes are equal to the resident run's (they must be).
On CUDA the streamed run is measured twice: copies overlapped with the computation (pinned memory,
side stream: memory/streaming.py) and plain blocking copies (the layers' weights then rest unpinned).
On the CPU the CPU stands in for the GPU: the weights are used where they rest, so the figures are the
hooks' own cost per step (the same placement and hook code as on a GPU), not a transfer time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dev.bench.generate import PRESETS, build_random_model
from vilau_backend.memory.placement import STREAMED, Placement, apply_placement, remove_placement
from vilau_backend.memory.streaming import rebuilt
from vilau_backend.memory.weight_quantization import QUANTIZE_CHOICES
from vilau_backend.model.vila_u import resolve_device, resolve_dtype
from vilau_backend.tasks.generate import ImageSampling, generate_codes


class Stop(Exception):
    pass


def timed_positions(model, positions: int) -> tuple[float, torch.Tensor]:
    """(seconds per position after the first, the codes of the first `positions` positions)."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    marks: list[float] = []
    kept: list[torch.Tensor] = []

    def on_position(done: int, total: int, codes: torch.Tensor) -> None:
        sync()
        marks.append(time.perf_counter())
        if done >= positions:
            kept.append(codes.clone())
            raise Stop

    try:
        generate_codes(model, "a red apple on a table", seed=0, sampling=ImageSampling(top_k=1), compile=False,
                       on_position=on_position)
    except Stop:
        pass
    return (marks[-1] - marks[0]) / (len(marks) - 1), kept[0]


def best(model, positions: int, repeats: int) -> tuple[float, torch.Tensor]:
    runs = [timed_positions(model, positions) for _ in range(repeats + 1)][1:]  # the first warms up
    return min(r[0] for r in runs), runs[0][1]


def streamed_plan(model, streamed: int) -> Placement:
    """Resident layers first, the last `streamed` from CPU memory, as plan_placement orders them."""
    n_layers, main = len(model.llm.model.layers), str(model.device)
    return Placement(main=main, layers=(main,) * (n_layers - streamed) + (STREAMED,) * streamed)


def hook_seconds(layer, calls: int = 200) -> float:
    """Seconds one streamed layer's hook spends per call around the layer's own work (fetching and installing
    the copies, putting the resting weights back), synchronised."""
    hook = layer._hf_hook
    sync = torch.cuda.synchronize if hook.execution_device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        hook.pre_forward(layer)
        hook.post_forward(layer, None)
    sync()
    return (time.perf_counter() - start) / calls


def rebuild_seconds(layer, calls: int = 200) -> float:
    """Seconds the CUDA path spends per layer call re-making the layer's tensors around their copies (quantized
    tensor subclasses, bitsandbytes' state), measured here with the copies left out: the bookkeeping alone."""
    resting = list(layer._hf_hook.resting.values())
    start = time.perf_counter()
    for _ in range(calls):
        for tensor in resting:
            rebuilt(tensor, lambda plain: plain)
    return (time.perf_counter() - start) / calls


def bench(preset: str, quantize: str, args, device: torch.device, dtype: torch.dtype) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_model(preset, dtype, device, Path(tmp), quantize=quantize)
        n_layers = len(model.llm.model.layers)
        plan = streamed_plan(model, args.streamed or n_layers // 2)
        resident_s, codes = best(model, args.positions, args.repeats)
        print(f"{preset} ({n_layers} layers, {dtype}, quantize {quantize}, {device}): resident "
              f"{1000 * resident_s:.2f} ms/position", flush=True)
        for overlap in ([True, False] if device.type == "cuda" else [None]):
            apply_placement(model, plan, overlap=overlap)
            try:
                streamed_s, streamed_codes = best(model, args.positions, args.repeats)
                hook_s = hook_seconds(model.llm.model.layers[-1])
                rebuild_s = rebuild_seconds(model.llm.model.layers[-1])
            finally:
                remove_placement(model, device)
            extra = streamed_s - resident_s
            label = {True: "overlapped copies", False: "plain copies", None: "hooks, no copies"}[overlap]
            print(f"  {plan.streamed} layers streamed ({label}): {1000 * streamed_s:.2f} ms/position, "
                  f"+{1000 * extra:.2f} ms per step, +{1000 * extra / plan.streamed:.3f} ms per streamed layer; "
                  f"hook alone {1e6 * hook_s:.0f} us per layer call (re-making the tensors around copies, as on CUDA: "
                  f"{1e6 * rebuild_s:.0f} us); "
                  f"codes equal to resident: {torch.equal(streamed_codes, codes)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, nargs="+", default=["golden-size"])
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, nargs="+", default=list(QUANTIZE_CHOICES))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--streamed", type=int, default=None, help="decoder layers to stream (default: half)")
    parser.add_argument("--positions", type=int, default=24, help="grid positions timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs each, after one warm-up")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    for preset in args.preset:
        for quantize in args.quantize:
            bench(preset, quantize, args, device, dtype)


if __name__ == "__main__":
    main()
