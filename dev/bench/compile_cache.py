"""Compile once per machine: the first compiled run of a fresh process, cold and warm.

    python -m dev.bench.compile_cache [--preset golden-size] [--batch 1] [--device cpu]

Runs the same child process twice with one new, empty pack compile-cache folder (and inductor's
cache where the pack puts it, inside that folder): the first child compiles and saves, the
second finds what the first left. Each child times a
compiled text-to-image run (the image step) and then a 2-row compiled answer (the answer step),
each twice: compile seconds = first run - second run. Prints one JSON line per child and the
warm/cold ratios.
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

REPO = Path(__file__).resolve().parents[2]


def child(args) -> None:
    import torch

    from dev.bench.generate import answer_seconds, build_random_model, timed_run
    from vilau_backend.decoding import compile_cache

    compile_cache.use_folder(args.cache)
    compile_cache.own_inductor_cache()  # as the command line does
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_model(args.preset, torch.float32, device, Path(tmp))
        result = {}
        for name, run in (("image", lambda: timed_run(model, args.batch, 0, True, None).loop_s),
                          ("answer", lambda: answer_seconds(model, 2, True, 16)[0])):
            first = _seconds(run)
            again = _seconds(run)
            result[name] = dict(first_s=round(first, 2), replay_s=round(again, 2), compile_s=round(first - again, 2))
    print(json.dumps(result))


def _seconds(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def parent(args) -> None:
    with tempfile.TemporaryDirectory() as work:
        cache = Path(work) / "pack-cache"
        results = {}
        for label in ("cold", "warm"):
            # inductor's cache where the pack puts it (not a folder other runs on this machine filled)
            env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
            command = [sys.executable, "-m", "dev.bench.compile_cache", "--child", "--cache", str(cache),
                       "--preset", args.preset, "--batch", str(args.batch), "--device", args.device]
            t = time.perf_counter()
            output = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
            results[label] = json.loads(output.strip().splitlines()[-1])
            results[label]["process_s"] = round(time.perf_counter() - t, 1)
            print(label, json.dumps(results[label]), flush=True)
        saved = sorted(p.name for p in cache.iterdir() if p.is_file())
    print("saved:", saved)
    for step in ("image", "answer"):
        cold, warm = results["cold"][step], results["warm"][step]
        print(f"{step} step: compile {cold['compile_s']} s cold, {warm['compile_s']} s warm "
              f"(warm/cold {warm['compile_s'] / cold['compile_s']:.2f}); first run {cold['first_s']} s cold, "
              f"{warm['first_s']} s warm (warm/cold {warm['first_s'] / cold['first_s']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="golden-size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
