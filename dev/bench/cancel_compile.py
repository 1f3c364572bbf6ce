"""Worst-case Cancel latency while a step compiles, on the small random test model (CPU).

    python bench/cancel_compile.py [--kind image text] [--model DIR]

ComfyUI's Cancel sets a flag that the nodes' callbacks read; the backend calls them before a run
compiles (`on_compile`) and after every position or token. A Cancel pressed just after the last
check before the compile is the worst case: it takes effect at the first callback after the
compile. This script plays that Cancel in a fresh process, where nothing is compiled yet: for
the image step at `on_compile` (the prefill and the compile of the first position follow), for
the answer step after the check of the first token (the compile of the second follows); it
prints the seconds from the Cancel to the stop.
Each kind runs in its own process (dynamo's cache would make a second run a replay), with an
empty inductor cache (TORCHINDUCTOR_CACHE_DIR), as a first run after installing: inductor keeps
compiled kernels on disk, and a later process that finds them compiles several times faster
(`--warm-cache` measures that case: run it after a cold run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Cancelled(Exception):
    pass


def measure(kind: str, model_dir: str) -> float:
    import torch

    from vilau_backend.tasks.generate import generate_codes
    from vilau_backend.model.vila_u import VilaUModel
    from vilau_backend.tasks.understand import GREEDY, describe_images

    model = VilaUModel.load(model_dir, dtype="float32", device="cpu")
    pressed: list[float] = []
    compiling: list[bool] = []

    def press() -> None:
        pressed.append(time.monotonic())

    def check(step: int, *_) -> None:
        if pressed:
            raise Cancelled
        if kind == "text" and step == 0:
            press()  # just after this check: the answer step compiles next

    try:
        if kind == "image":
            generate_codes(model, "a red fox", compile=True, on_compile=lambda: compiling.append(True) or press(),
                           on_position=check)
        else:
            image = torch.rand(1, 32, 32, 3)
            describe_images(model, image, "Describe the image.", sampling=GREEDY, max_new_tokens=8, compile=True,
                            on_compile=lambda: compiling.append(True), on_token=check)
    except Cancelled:
        if compiling:
            return time.monotonic() - pressed[0]
    raise SystemExit("the run was not compiled (on_compile never called)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", default=["image", "text"], choices=["image", "text"])
    parser.add_argument("--model", help="a VILA-U checkpoint folder (default: a small random one)")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual on-disk cache")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(f"{measure(args.one, args.model):.1f}")
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            from vilau_backend.testing.random_checkpoint import write_random_checkpoint

            model_dir = str(write_random_checkpoint(Path(scratch) / "small"))
        for kind in args.kind:
            env = dict(os.environ)
            if not args.warm_cache:
                env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=scratch)
            out = subprocess.run([sys.executable, "-m", "dev.bench.cancel_compile", "--one", kind, "--model", model_dir],
                                 cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout.split()[-1]
            cache = "warm" if args.warm_cache else "empty"
            print(f"{kind} step ({cache} inductor cache): Cancel pressed as compiling began took effect after {out} s")


if __name__ == "__main__":
    main()
