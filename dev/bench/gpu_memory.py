"""VRAM and generation speed of each quantize choice on a GPU, at full size (for the GPU check script).

    python -m dev.bench.gpu_memory [--model DIR | --write DIR] [--quantize none int8 4bit] [--device cuda]

Without --model it writes the 7B-shaped random checkpoint (vilau_backend/testing/random_checkpoint.py
FULL_7B_256, about 15 GB) into --write (default: a temporary folder, deleted after).
Each choice runs in a fresh process: load in bf16 on the GPU, then text-to-image at
batch 1 (256 positions, decode included). Printed per choice: GPU memory after loading,
peak GPU memory during generation (the goals, 256 px batch 1: bf16 <= 15.5 GB,
int8 <= 9 GB, 4-bit <= 6 GB), ms per position and the ratio to bf16.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

GB = 1e9
GOALS_GB = {"none": 15.5, "int8": 9.0, "4bit": 6.0}


def measure(model_dir: str, device: str, quantize: str) -> dict:
    """In this process: load, generate one image twice (the second timed); the figures as a dict."""
    import torch

    from vilau_backend.tasks.generate import generate_images
    from vilau_backend.model.vila_u import VilaUModel

    start = time.perf_counter()
    model = VilaUModel.load(model_dir, dtype="bfloat16", device=device, quantize=quantize)
    torch.cuda.synchronize(device)
    loaded = torch.cuda.memory_allocated(device)
    load_seconds = time.perf_counter() - start
    generate_images(model, "warm-up", seed=0)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    generate_images(model, "a red apple on a table", seed=1)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"quantize": quantize, "load_seconds": load_seconds, "loaded": loaded,
            "peak": torch.cuda.max_memory_allocated(device), "ms_per_position": 1000 * seconds / model.config.tokens_per_image}


def run_child(model_dir: str, device: str, quantize: str) -> dict:
    code = (f"import json; from dev.bench.gpu_memory import measure; "
            f"print(json.dumps(measure({model_dir!r}, {device!r}, {quantize!r})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        return {"quantize": quantize, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a full-size checkpoint folder (default: write a random one)")
    parser.add_argument("--write", help="where to write the random checkpoint (kept); default: a temporary folder")
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "4bit"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from vilau_backend.testing.random_checkpoint import FULL_7B_256, write_random_checkpoint

    scratch = None
    model_dir = args.model
    if model_dir is None:
        scratch = None if args.write else tempfile.mkdtemp(prefix="vilau-full-")
        model_dir = args.write or str(Path(scratch) / "vila-u-7b-random")
        start = time.perf_counter()
        write_random_checkpoint(model_dir, FULL_7B_256)
        print(f"wrote the 7B-shaped random checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        print("| quantize | VRAM after loading | peak VRAM, 256 px batch 1 | goal | ms/position | vs bf16 |")
        print("|---|---|---|---|---|---|")
        base = None
        for quantize in args.quantize:
            r = run_child(model_dir, args.device, quantize)
            if "error" in r:
                print(f"| {quantize} | failed: {r['error']} |||||", flush=True)
                continue
            base = base or (r["ms_per_position"] if quantize == "none" else None)
            ratio = f"{r['ms_per_position'] / base:.2f}x" if base else "-"
            print(f"| {quantize} | {r['loaded'] / GB:.2f} GB | {r['peak'] / GB:.2f} GB | <= {GOALS_GB[quantize]} GB | "
                  f"{r['ms_per_position']:.1f} | {ratio} |", flush=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
