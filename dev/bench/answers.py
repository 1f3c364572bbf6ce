"""Benchmark batched image Q&A ("one answer per image"): answers per second at several batch sizes.

    python -m dev.bench.answers [--preset golden-size medium] [--batch 1 4 16] [--tokens 32] [--threads N] [--dtype ...]

Random-weight models of the presets in dev/bench/generate.py. For every batch size B, B images are
answered together in one padded pass (vision encoding, prefill, then --tokens greedy steps;
an answer that meets EOS earlier stops, the pass goes on for the others) and the best of
--repeats runs is reported: answers/s, generated tokens/s and the speed-up over B = 1, and the
pass split into image encoding + prompt prefill (per image; it grows with B) and the cost of one
decode step for all B rows (what batching shares).
Timings are for comparing runs on one machine, not absolute figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


from dev.bench.generate import PRESETS, build_random_model, peak_memory_mb

from vilau_backend.model.vila_u import resolve_device, resolve_dtype
from vilau_backend.tasks.understand import GREEDY, describe_images

QUESTION = "Describe the image in detail."


def time_batch(model, batch: int, tokens: int, repeats: int) -> tuple[float, int]:
    """Best wall time of answering `batch` random images together, and the tokens generated
    (`tokens` 1: the image encodings and the prompt prefill, plus one token)."""
    images = torch.rand(batch, 256, 256, 3, generator=torch.Generator().manual_seed(batch))
    best, generated = float("inf"), 0
    for _ in range(repeats):
        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        answers = describe_images(
            model, images, QUESTION, batch=True, batch_size=batch, sampling=GREEDY, max_new_tokens=tokens
        )
        sync()
        best = min(best, time.perf_counter() - start)
        generated = sum(len(answer.output_ids) for answer in answers)
    return best, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, nargs="+", default=["golden-size", "medium"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens of every answer")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    for preset in args.preset:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_random_model(preset, dtype, device, Path(tmp))
            print(f"preset {preset} on {device} ({dtype}), {torch.get_num_threads()} threads, "
                  f"{args.tokens} tokens per answer at most")
            time_batch(model, 1, 2, 1)  # warm-up: first-call allocations, lazy inits
            base = None
            for batch in args.batch:
                seconds, generated = time_batch(model, batch, args.tokens, args.repeats)
                prefill, _ = time_batch(model, batch, 1, args.repeats)
                steps = max(1, generated // batch - 1)  # decode steps after the first token (about)
                rate = batch / seconds
                base = base or rate
                print(f"  B={batch:>3}: {rate:7.3f} answers/s, {generated / seconds:8.1f} tokens/s, "
                      f"x{rate / base:.2f} vs B={args.batch[0]}, {seconds:.2f} s per pass = "
                      f"{prefill / batch:.2f} s/image encoding+prefill + {1000 * (seconds - prefill) / steps:.0f} ms "
                      f"per decode step (all {batch} rows), peak {peak_memory_mb(device)}")


if __name__ == "__main__":
    main()
