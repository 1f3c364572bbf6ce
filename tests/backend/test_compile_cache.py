"""Compile once per machine: a second process finds the compiled answer step that the first saved
(torch's graph caches hit, nothing rebuilt), and the saved file is named by torch, device, model
shapes and step size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import torch

from conftest import REPO
from vilau_backend.decoding import compile_cache
from vilau_backend.decoding.compiled_steps import step_key

CHILD = """
import json, sys
import numpy as np, torch
from torch._dynamo.utils import counters
from vilau_backend.decoding import compile_cache
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.tasks.understand import GREEDY, describe_images
compile_cache.use_folder(sys.argv[2])
compile_cache.own_inductor_cache()  # as the command line does
model = VilaUModel.load(sys.argv[1], dtype="float32", device="cpu")
image = torch.from_numpy(np.random.default_rng(0).random((1, 24, 24, 3), dtype=np.float32))
[answer] = describe_images(model, image, "Describe the image.", sampling=GREEDY, max_new_tokens=4, compile=True)
print(json.dumps({"ids": answer.output_ids, **{k: dict(counters[k]) for k in ("inductor", "aot_autograd")}}))
"""


def run_child(checkpoint, folder) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), str(folder)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_compiled_step_the_first_saved(small_checkpoint, tmp_path):
    folder = tmp_path / "compile-cache"
    cold = run_child(small_checkpoint, folder)
    assert cold["inductor"].get("fxgraph_cache_miss") == 1 and not cold["inductor"].get("fxgraph_cache_hit"), cold
    saved = [p.name for p in folder.glob("*.bin")]
    assert len(saved) == 1 and saved[0].startswith(f"torch-{torch.__version__}-cpu-") and "-text-1x" in saved[0]
    assert (folder / "inductor").is_dir()  # inductor's own cache, kept in the pack's folder

    warm = run_child(small_checkpoint, folder)
    assert warm["inductor"].get("fxgraph_cache_hit") == 1 and not warm["inductor"].get("fxgraph_cache_miss"), warm
    assert warm["aot_autograd"].get("autograd_cache_hit") == 1, warm
    assert warm["ids"] == cold["ids"]


def test_another_size_model_or_torch_looks_for_another_file(small_model, tmp_path, monkeypatch):
    config = small_model.config
    model = SimpleNamespace(config=config, weight_quantization="none", device=torch.device("cpu"))
    key = step_key(small_model, 2, 512, kind="text")
    previous = compile_cache.use_folder(tmp_path)
    try:
        name = compile_cache.cache_file(model, key)
        assert name.parent == tmp_path and name.name.startswith(f"torch-{torch.__version__}-cpu-")
        assert compile_cache.cache_file(model, replace(key, rows=4)) != name
        deeper = replace(config.llm, num_hidden_layers=config.llm.num_hidden_layers + 1)
        assert compile_cache.cache_file(SimpleNamespace(**{**vars(model), "config": replace(config, llm=deeper)}), key) != name
        assert compile_cache.cache_file(SimpleNamespace(**{**vars(model), "weight_quantization": "int8"}), key) != name
        monkeypatch.setattr(torch, "__version__", "0.0.0")
        assert compile_cache.cache_file(model, key) != name
        compile_cache.use_folder(None)
        assert compile_cache.cache_file(model, key) is None
    finally:
        compile_cache.use_folder(previous)


def test_only_the_packs_own_processes_move_inductors_cache(small_model, tmp_path, monkeypatch):
    """Inside ComfyUI (no own_inductor_cache) loading a compiled step leaves the environment, which other
    packs' compiles read, as it was; the command line keeps inductor's cache in the pack's folder."""
    from torch._inductor.runtime import cache_dir_utils  # noqa: F401 - importing inductor may set its default

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "recorded")  # so that the test's own setting is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(compile_cache, "_inductor_in_folder", [False])
    previous = compile_cache.use_folder(tmp_path)
    try:
        key = step_key(small_model, 2, 512, kind="text")
        before = dict(os.environ)
        assert compile_cache.load(small_model, key) is False  # nothing saved yet
        assert dict(os.environ) == before
        from vilau_backend.cli import main

        assert main(["decode", "--model", str(tmp_path / "no-model"), "--codes", "c", "--out-dir", "o"]) == 2
        compile_cache.load(small_model, key)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    finally:
        compile_cache.use_folder(previous)
