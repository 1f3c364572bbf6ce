"""Cancel latency and memory over many jobs, in a real ComfyUI (the pinned one, with this pack).

    python -m dev.bench.robustness [--cancels 20] [--jobs 200]

Starts ComfyUI headless on 127.0.0.1 with a small random VILA-U model and HF_ENDPOINT pointing at
a loopback listener that accepts connections and never answers, then measures:

- cancel latency during a hung download: queue a loader of a published model, press Cancel
  (POST /interrupt) one second into its wait, time until ComfyUI reports the run interrupted;
- cancel latency during text-to-image (a 32x32-grid small random model, 1024 positions): Cancel once the
  first position is reported, same timing;
- the server's resident memory before and after `--jobs` jobs that alternate between text to
  image, image Q&A and encode/blend/decode graphs (new seeds, so nothing is served from cache).

Prints median and max latency, and RSS in MiB. Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dev.comfy_harness import server as cs
from dev.comfy_harness.silent_hub import SilentListener

REPO = Path(__file__).resolve().parents[2]

SMALL, BIG = "vila-u-small-64", "vila-u-small-256"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def loader(model: str) -> dict:
    return {"class_type": "VILAU_ModelLoader",
            "inputs": {"model": model, "dtype": "fp32", "device": "auto", "download_if_missing": True}}


def t2i(seed: int) -> dict:
    return {"class_type": "VILAU_TextToImage",
            "inputs": {"model": ["1", 0], "prompt": "a red fox", "negative_prompt": "", "cfg": 3.0, "seed": seed,
                       "batch_size": 1, "temperature": 1.0, "top_k": 900, "top_p": 0.96}}


def job(i: int) -> dict:
    """Job i of the memory run: text to image, image Q&A, encode/blend/decode in turn."""
    preview = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    if i % 3 == 0:
        return {"1": loader(SMALL), "2": t2i(i), "3": preview}
    if i % 3 == 1:
        qa = {"model": ["1", 0], "image": ["3", 0], "question": "What is it?", "batch_mode": "one answer per image",
              "seed": i, "max_new_tokens": 8,
              "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.6, "repetition_penalty": 1.0}
        return {"1": loader(SMALL), "3": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
                "2": {"class_type": "VILAU_ImageQA", "inputs": qa},
                "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    return {"1": loader(SMALL), "5": t2i(i), "6": {"class_type": "LatentBlend", "inputs": {
            "samples1": ["5", 1], "samples2": ["5", 1], "blend_factor": 0.5}},
            "2": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["6", 0]}}, "3": preview}


def cancel_latency(server, graph: dict, started, delay: float = 0.0) -> float:
    """Queue `graph`, wait until `started(message)` and `delay` s more, press Cancel; seconds until
    ComfyUI reports the run interrupted."""
    with server.websocket() as ws:
        pid = server.queue(graph, client_id=ws.client_id)
        ws.wait_for(lambda m: started(m, pid), timeout=120)
        time.sleep(delay)
        pressed = time.monotonic()
        server.interrupt()
        ws.wait_for(lambda m: m.get("type") == "execution_interrupted" and m["data"]["prompt_id"] == pid, timeout=60)
        latency = time.monotonic() - pressed
    server.wait(pid, timeout=60, check=False)
    return latency


def download_started(message: dict, pid: str) -> bool:
    data = message.get("data") or {}
    return message.get("type") == "executing" and data.get("node") == "1" and data.get("prompt_id") == pid


def generation_started(message: dict, pid: str) -> bool:
    return message.get("type") == "progress" and message["data"]["node"] == "2" and message["data"]["prompt_id"] == pid


def report(name: str, latencies: list[float]) -> None:
    print(f"{name}: {len(latencies)} cancels, median {statistics.median(latencies):.3f} s, "
          f"max {max(latencies):.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    from PIL import Image

    from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

    run = Path(tempfile.mkdtemp(prefix="vilau-robustness-"))
    write_random_checkpoint(run / "models" / "vila-u" / SMALL)
    write_random_checkpoint(run / "models" / "vila-u" / BIG, CheckpointSizes(image_size=256, patch_size=8), seed=1)
    hub = SilentListener()
    env = {"OMP_NUM_THREADS": "1", "HF_ENDPOINT": hub.url, "HF_HUB_ETAG_TIMEOUT": "30"}
    server = cs.ComfyServer(cs.comfyui_dir(), run, {cs.PACK: cs.REPO_ROOT}, env=env, offline=False)
    server.start(timeout=300)
    try:
        pixels = np.random.default_rng(1).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(server.input_dir / "noise.png")
        hung = {"1": loader("mit-han-lab/vila-u-7b-256"), "2": t2i(0),
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
        downloads = [cancel_latency(server, hung, download_started, delay=1.0) for _ in range(args.cancels)]
        report("cancel during a hung download", downloads)
        big = {"1": loader(BIG), "2": t2i(0), "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
        generation = []
        for i in range(args.cancels):
            big["2"]["inputs"]["seed"] = 1000 + i
            generation.append(cancel_latency(server, big, generation_started))
        report("cancel during text to image", generation)
        server.run(job(0), timeout=300)  # the model loaded, one job of each kind run once
        before = rss_mib(server.proc.pid)
        started = time.monotonic()
        for i in range(args.jobs):
            server.run(job(i + 1), timeout=300)
        print(f"server RSS: {before:.0f} MiB before, {rss_mib(server.proc.pid):.0f} MiB after {args.jobs} jobs "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        server.stop()
        hub.close()


if __name__ == "__main__":
    main()
