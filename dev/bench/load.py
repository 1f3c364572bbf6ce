"""Load time and peak memory of `VilaUModel.load` for each quantize choice.

    python -m dev.bench.load --model DIR [--quantize none int8 4bit] [--dtype bfloat16] [--device cpu] [--cache DIR]
    python -m dev.bench.load --write DIR [--size full|small]      # write a random checkpoint first (then measure it)

--write writes a random-weight checkpoint in the published layout (vilau_backend/testing/random_checkpoint.py;
`full` is 7B-shaped: about 15 GB on disk and several minutes). Each quantize choice
loads in a fresh Python process, which first loads a small random model so that imports and
lazy initialisations are done; its resident memory then is the baseline. Printed per
choice: load time, weight bytes as loaded, peak RSS (VmHWM) and what the load
added beyond the weights (peak - baseline - weights). On CUDA, also the peak GPU memory.

Each quantized choice loads twice: first into an empty quantized cache (it quantizes and
writes the copy), then again (it reads the copy: vilau_backend/memory/quantized_cache.py);
the last line compares the second load's time with the unquantized load's. The cache is a
temporary folder unless --cache names one (an existing copy there makes both loads reads).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

GiB = 2**30


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process's peak resident set size in bytes: VmHWM from /proc, which belongs to the
    address space exec made. Not ru_maxrss: Linux carries that over from the parent across
    fork and exec, so a child of a large pytest process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_load(model_dir: str, warmup_dir: str, dtype: str, device: str, quantize: str,
                 cache: str | None = None) -> dict:
    """In this process: load the warm-up model, drop it, then load `model_dir` (quantized layers kept in and
    read from `cache`, None: none); the figures as a dict."""
    import gc

    import torch

    from vilau_backend.model.vila_u import VilaUModel

    VilaUModel.load(warmup_dir, dtype=dtype, device=device, quantize=quantize, quantized_cache=cache)
    gc.collect()
    baseline = rss_now()
    start = time.perf_counter()
    model = VilaUModel.load(model_dir, dtype=dtype, device=device, quantize=quantize, quantized_cache=cache)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    result = {"quantize": quantize, "seconds": seconds, "weights": model.weight_bytes(), "baseline": baseline,
              "peak_rss": peak, "rss_after": rss_now()}
    if torch.device(device).type == "cuda":
        result["peak_gpu"] = torch.cuda.max_memory_allocated(device)
    return result


def run_child(args: argparse.Namespace, quantize: str, warmup: Path, cache: str | None = None) -> dict:
    code = (f"import json; from dev.bench.load import measure_load; "
            f"print(json.dumps(measure_load({args.model!r}, {str(warmup)!r}, {args.dtype!r}, {args.device!r}, "
            f"{quantize!r}, {cache!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder to load")
    parser.add_argument("--write", help="write a random checkpoint into this folder first, then load it")
    parser.add_argument("--size", choices=["small", "full"], default="full", help="size for --write (default full)")
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "4bit"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", help="quantized cache folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    from vilau_backend.testing.random_checkpoint import FULL_7B_256, CheckpointSizes, write_random_checkpoint

    if args.write:
        start = time.perf_counter()
        write_random_checkpoint(args.write, FULL_7B_256 if args.size == "full" else CheckpointSizes())
        print(f"wrote {args.size} checkpoint to {args.write} in {time.perf_counter() - start:.0f} s "
              f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)", flush=True)
        args.model = args.model or args.write
    if not args.model:
        parser.error("give --model or --write")
    with tempfile.TemporaryDirectory() as tmp:
        warmup = write_random_checkpoint(Path(tmp) / "warmup")
        cache = args.cache or str(Path(tmp) / "quantized")
        print(f"{args.model}: dtype {args.dtype}, device {args.device}, quantized cache {cache}")
        print("| quantize | load time | weights | peak RSS | baseline | added beyond the weights |")
        print("|---|---|---|---|---|---|")
        seconds = {}
        for quantize in args.quantize:
            loads = [("", None)] if quantize == "none" else [(", quantized, copy written", cache),
                                                              (", read from the copy", cache)]
            for label, folder in loads:
                r = run_child(args, quantize, warmup, folder)
                seconds[quantize + label] = r["seconds"]
                print_row(quantize + label, r)
        compare_with_unquantized(seconds, [q for q in args.quantize if q != "none"])


def print_row(label: str, r: dict) -> None:
    added = r["peak_rss"] - r["baseline"] - r["weights"]
    gpu = f", peak GPU {r['peak_gpu'] / GiB:.2f} GiB" if "peak_gpu" in r else ""
    print(f"| {label} | {r['seconds']:.1f} s | {r['weights'] / GiB:.2f} GiB | {r['peak_rss'] / GiB:.2f} GiB | "
          f"{r['baseline'] / GiB:.2f} GiB | {added / GiB:.2f} GiB{gpu} |", flush=True)


def compare_with_unquantized(seconds: dict[str, float], schemes: list[str]) -> None:
    """The quantized cache's goal: a load from the copy within 1.5x the unquantized load (issue 19)."""
    if "none" not in seconds:
        return
    for scheme in schemes:
        first, second = seconds[f"{scheme}, quantized, copy written"], seconds[f"{scheme}, read from the copy"]
        print(f"{scheme}: first load {first:.1f} s, load from the copy {second:.1f} s = "
              f"{second / seconds['none']:.2f}x the unquantized load ({seconds['none']:.1f} s; goal <= 1.5x)")


if __name__ == "__main__":
    main()
