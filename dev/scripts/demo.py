"""Run the text-to-image and image Q&A templates in a headless ComfyUI with this pack.

    .venv/bin/python -m dev.scripts.demo [--models DIR] [--out DIR]      (dev/scripts/demo.sh sets up .venv first)

Starts the pinned ComfyUI (.cache/comfyui) with this checkout as the custom node
pack ComfyUI-VILA-U, converts example_workflows/VILA-U 06 Text to Image, Upscaled.json and
example_workflows/VILA-U 01 Image Q&A.json to API prompts, queues them and prints what they
wrote. The model: a published VILA-U folder (vila-u-7b-256 or vila-u-7b-384) if
one is in --models / $VILAU_MODELS / <repo>/models/vila-u / .cache/comfyui/models/vila-u,
else a small random model in the published layout (then the image is noise and
the answer random tokens: it shows the pipeline, not the model). Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

REPO = Path(__file__).resolve().parents[2]

SMALL = "vila-u-small-demo"
TEMPLATES = ("VILA-U 06 Text to Image, Upscaled", "VILA-U 01 Image Q&A")


def find_published(candidates: list[Path]) -> Path | None:
    from vilau_backend.checkpoint.config import is_vila_u_folder
    from vilau_backend.checkpoint.published import PUBLISHED

    for root in candidates:
        for name in (repo_id.split("/")[-1] for repo_id in PUBLISHED):  # the folders the loader downloads into
            if is_vila_u_folder(root / name):
                return root / name
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a folder holding vila-u-7b-256/ or vila-u-7b-384/")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "demo", help="ComfyUI's base folder for the run")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("VILAU_DEMO_TIMEOUT", 7200)))
    args = parser.parse_args()
    t0 = time.monotonic()

    candidates = [p for p in (args.models, Path(os.environ["VILAU_MODELS"]) if os.environ.get("VILAU_MODELS") else None,
                              REPO / "models" / "vila-u", cs.comfyui_dir() / "models" / "vila-u") if p]
    published = find_published(candidates)
    run = args.out.resolve()
    extra_yaml = None
    if published is not None:
        model = published.name
        extra_yaml = run / "extra_model_paths.yaml"
        run.mkdir(parents=True, exist_ok=True)
        extra_yaml.write_text(f"vila_u_demo:\n    vila_u: {published.parent}\n", encoding="utf-8")
        what = f"the published model {model} from {published}"
    else:
        model = SMALL
        where = ", ".join(str(c) for c in candidates)
        what = (f"the SMALL RANDOM demo model {SMALL} (no vila-u-7b-256/384 folder in {where}): the image is noise "
                "and the answer random tokens; put a published model in one of those folders for real output")

    import torch

    gpu = torch.cuda.is_available()
    print(f"demo: using {what}; running on {'the GPU' if gpu else 'the CPU'}", flush=True)
    server = cs.pack_server(run, None if published else SMALL, extra_model_paths=extra_yaml, cpu=not gpu)
    server.start(timeout=300)
    try:
        if server.import_failed(cs.PACK):
            print(server.log_tail(), file=sys.stderr)
            print("demo: ComfyUI could not import the pack (IMPORT FAILED above)", file=sys.stderr)
            return 1
        object_info = server.object_info()
        results = {}
        for name in TEMPLATES:
            workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
            extra = {} if published else {"VILAU_ImageQA": {"max_new_tokens": 48}}  # random tokens rarely end
            prompt = wa.to_api(workflow, object_info, wa.model_overrides(workflow, model, **extra))
            started = time.monotonic()
            entry = server.run(prompt, timeout=args.timeout)
            seconds = time.monotonic() - started
            files = [str(p) for p in server.output_files(entry) if p.is_file() and server.output_dir in p.parents]
            answers = [t for n in wa.nodes_of_type(workflow, "VILAU_ImageQA") for t in server.ui_text(entry, str(n["id"]))]
            if answers:  # the answer as a file too, next to the images
                text_file = server.output_dir / "VILA-U" / "image_qa_answer.txt"
                text_file.parent.mkdir(parents=True, exist_ok=True)
                text_file.write_text("\n\n".join(answers) + "\n", encoding="utf-8")
                files.append(str(text_file))
            results[name] = {"seconds": round(seconds, 1), "files": files, "answers": answers}
            print(f"demo: {name}: done in {seconds:.1f} s", flush=True)
            for f in files:
                print(f"    wrote {f}")
            for a in answers:
                print(f"    answer: {a!r}")
        summary = {"model": model, "published": published is not None, "device": "gpu" if gpu else "cpu",
                   "templates": results, "seconds": round(time.monotonic() - t0, 1)}
        (run / "demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(f"demo: used {'a published model' if published else 'the small random demo model'} ({model}); "
              f"outputs in {server.output_dir}; summary in {run / 'demo_summary.json'}")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
