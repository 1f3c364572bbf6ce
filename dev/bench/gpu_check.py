"""The figures of the GPU check (dev/bench/gpu_check.sh), one part per call, each figure printed and
written to a JSON file as soon as it is measured, so that a part cut short by its time limit still
leaves every finished figure.

    python -m dev.bench.gpu_check images  --json OUT.json [--label L] [--batch 1] [--geometry 256] [--answers]
    python -m dev.bench.gpu_check [...] --dry-run      (the golden-size preset on the CPU, torch.cuda stubbed)

`images`: 7B-shaped random weights built in GPU memory (no checkpoint written), bf16; for each batch
size: eager ms/position, compiled ms/position (in the mode the pack chooses for this process:
CUDA graphs, or inductor alone under cudaMallocAsync), compile seconds, inductor's cudagraph_skips,
peak VRAM and s/image; with --answers, answer tokens/s eager and compiled (batch 1).

--dry-run runs the same code on the CPU with the golden-size preset: torch.cuda's timing and memory calls are
stubbed (the allocator backend read from PYTORCH_CUDA_ALLOC_CONF, as CUDA would) and torch.compile
traces with dynamo's eager backend, so a Python error shows here and not on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


from dev.bench.generate import answer_seconds, build_random_model, timed_run
from vilau_backend.decoding.compile_choice import compile_mode


class Figures:
    """Figures under `label` in a JSON file {label: {name: value}}, rewritten atomically after each one."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label

    def add(self, name: str, value) -> None:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        data.setdefault(self.label, {})[name] = value
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, self.path)
        print(f"  {self.label} {name}: {value}", flush=True)


def stub_cuda() -> None:
    """--dry-run: torch.cuda's calls the check makes answer on a machine without a GPU, and torch.compile
    traces with dynamo's eager backend (inductor's CPU compile of even the golden-size step takes minutes)."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    backend = "cudaMallocAsync" if "backend:cudaMallocAsync" in conf.replace(" ", "") else "native"
    torch.cuda.get_allocator_backend = lambda: backend
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.reset_peak_memory_stats = lambda device=None: None
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.get_device_name = lambda device=None: "dry run (CPU)"
    compile_ = torch.compile
    torch.compile = lambda model, **kwargs: compile_(model, backend="eager", dynamic=kwargs.get("dynamic"))


def image_figures(model, figures: Figures, batch: int, device: torch.device) -> None:
    """Eager, then the compiled step's first run (compiling) and a timed replay, for `batch` images."""
    from torch._dynamo.utils import counters

    P = model.config.tokens_per_image
    timed_run(model, batch, 0, False, None)  # warm-up: lazy initialisations, first allocations
    torch.cuda.reset_peak_memory_stats(device)
    eager = timed_run(model, batch, 1, False, None)
    figures.add(f"b{batch}_eager_ms_per_position", round(1000 * eager.loop_s / P, 3))
    figures.add(f"b{batch}_eager_s_per_image", round((eager.loop_s + eager.decode_s) / batch, 3))
    figures.add(f"b{batch}_eager_peak_vram_gib", round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
    counters.clear()
    first = timed_run(model, batch, 0, True, None)
    torch.cuda.reset_peak_memory_stats(device)
    compiled = timed_run(model, batch, 1, True, None)
    figures.add(f"b{batch}_compile_s", round(first.loop_s - compiled.loop_s, 1))
    figures.add(f"b{batch}_cudagraph_skips", int(counters["inductor"]["cudagraph_skips"]))
    figures.add(f"b{batch}_compiled_ms_per_position", round(1000 * compiled.loop_s / P, 3))
    figures.add(f"b{batch}_compiled_s_per_image", round((compiled.loop_s + compiled.decode_s) / batch, 3))
    figures.add(f"b{batch}_compiled_peak_vram_gib", round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
    model.release_step_states()


def answer_figures(model, figures: Figures, tokens: int) -> None:
    """Answer tokens/s at batch 1 after an image-sized prompt, eager and compiled (decode steps only)."""
    for compiled in (False, True):
        answer_seconds(model, 1, compiled, tokens)  # warm-up; compiles the compiled step
        full, made = answer_seconds(model, 1, compiled, tokens)
        prefill, _ = answer_seconds(model, 1, compiled, 1)
        per_token = (full - prefill) / max(1, made - 1)
        figures.add(f"answer_{'compiled' if compiled else 'eager'}_tokens_per_s", round(1 / per_token, 1))
    model.release_step_states()


def images(args) -> None:
    device = torch.device("cpu" if args.dry_run else "cuda")
    figures = Figures(Path(args.json), args.label)
    mode = compile_mode(torch.device("cuda"))
    figures.add("allocator", torch.cuda.get_allocator_backend())
    figures.add("compile_mode", "cuda graphs" if mode.cuda_graphs else "inductor" if mode.compiled else "eager")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = build_random_model("golden-size" if args.dry_run else "full", torch.bfloat16, device, Path(tmp), args.geometry)
        figures.add(f"built_{args.geometry}px_s", round(time.perf_counter() - start, 1))
        for batch in args.batch:
            image_figures(model, figures, batch, device)
        if args.answers:
            answer_figures(model, figures, args.answer_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["images", "record"], help="record: add --name = --value to the file")
    parser.add_argument("--name")
    parser.add_argument("--value")
    parser.add_argument("--json", required=True, help="the JSON file the figures are added to")
    parser.add_argument("--label", default="native allocator")
    parser.add_argument("--geometry", choices=["256", "384"], default="256")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--answers", action="store_true", help="also answer tokens/s at batch 1")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="the golden-size preset on the CPU, torch.cuda stubbed")
    args = parser.parse_args()
    if args.part == "record":
        Figures(Path(args.json), args.label).add(args.name, args.value)
        return
    if args.dry_run:
        stub_cuda()
    images(args)


if __name__ == "__main__":
    main()
