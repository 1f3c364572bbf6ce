"""Dataset jobs' throughput: items/s of `caption` and `generate-batch` with 1 and 2 processes.

    python -m dev.bench.dataset_jobs [--preset small|medium] [--images 16] [--prompts 8] [--processes 1 2]

Writes a random-weight checkpoint (small: the random test model, CheckpointSizes(); medium: LLM 1024 x 8 layers, SigLIP 256
wide, a 16x16 grid of depth 4, 4096 codes), a folder of random images and a prompts file, then
runs each command as one process and under `torchrun --nproc-per-node N` (gloo on the CPU), each
into a new folder. Every process runs --threads threads (default 1: on a machine that other work
shares, more threads than free cores make every thread wait).
Prints the items per second from each run's summary.json (the job's time from the start of the
work to the merged summary; loading the model is not counted) and the wall time of the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

REPO = Path(__file__).resolve().parents[2]

PRESETS = {
    "small": CheckpointSizes(),
    "medium": CheckpointSizes(image_size=256, patch_size=16, siglip_width=256, siglip_layers=4, llm_hidden=1024, llm_layers=8,
                        llm_heads=16, n_embed=4096, depth_width=512, depth_layers=3, depth_heads=8),
}


def run(command: list[str], processes: int, threads: int) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    full = (launcher + ["-m", "vilau_backend"] if processes > 1 else [sys.executable, "-m", "vilau_backend"]) + command
    t = time.perf_counter()
    subprocess.run(full, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def report(label: str, summary_file: Path, wall: float) -> None:
    summary = json.loads(summary_file.read_text())
    done = summary["written"]
    print(f"{label}: {done} items in {summary['seconds']} s = {done / summary['seconds']:.3f} items/s "
          f"({summary['processes']} process(es); command {wall:.1f} s with loading)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = write_random_checkpoint(work / "model", PRESETS[args.preset])
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"picture number {i}"}) + "\n" for i in range(args.prompts)))
        for n in args.processes:
            images = work / f"images-{n}"
            images.mkdir()
            for i in range(args.images):
                Image.fromarray(np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(images / f"{i}.png")
            wall = run(["caption", str(images), "--model", str(model), "--greedy", "--max-new-tokens",
                        str(args.max_new_tokens)], n, args.threads)
            report(f"caption, {args.preset}", images / ".vilau-job" / "summary.json", wall)
            out = work / f"out-{n}"
            wall = run(["generate-batch", str(prompts), "--out", str(out), "--model", str(model)], n, args.threads)
            report(f"generate-batch, {args.preset}", out / ".vilau-job" / "summary.json", wall)


if __name__ == "__main__":
    main()
