"""Developer tooling that does not ship with the node pack: the real-ComfyUI test harness (comfy_harness/),
benchmarks (bench/) and scripts (scripts/). Run from the repository root: `python -m dev.bench.generate ...`."""
