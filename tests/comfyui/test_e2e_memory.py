"""Memory in a real ComfyUI: quantized loading, keep_loaded off, and the VILA-U Unload Model node.

Released weights are checked three ways: ComfyUI's log (the pack logs the release, and the
next use reads the weights from disk again), the node's text, and the server's resident
memory, which must drop by most of the model's weights (a model larger than the usual
small one, so that the drop stands out from the allocator's noise).
"""

from __future__ import annotations

import time

import psutil
import pytest

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

SMALL = "vila-u-small"
LARGER = "vila-u-larger"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

    run = tmp_path_factory.mktemp("run")
    srv = cs.pack_server(run, SMALL)
    # about 110 MB of fp32 weights (the LLM 512 wide x 8 layers)
    write_random_checkpoint(run / "models" / "vila-u" / LARGER, CheckpointSizes(llm_hidden=512, llm_layers=8), seed=2)
    with srv:
        yield srv


def loader(model=SMALL, **inputs):
    return wa.loader_node(model, dtype="fp32", **inputs)


def qa(model_ref, image_ref, question="what is this?"):
    return {"class_type": "VILAU_ImageQA",
            "inputs": {"model": model_ref, "image": image_ref, "question": question, "batch_mode": "one answer per image",
                       "seed": 0, "max_new_tokens": 6, "do_sample": False, "temperature": 0.9, "top_k": 50,
                       "top_p": 0.6, "repetition_penalty": 1.0}}


EMPTY = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x208040}}


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def ui_text(entry, node: str) -> str:
    return " ".join(entry["outputs"][node]["text"])


def test_int8_loader_says_so_and_answers(server):
    graph = {"1": loader(quantize="int8"), "2": EMPTY, "3": qa(["1", 0], ["2", 0])}
    entry = server.run(graph, timeout=180)
    assert "(int8) on cpu" in ui_text(entry, "1"), entry["outputs"]["1"]
    assert len(ui_text(entry, "3")) > 0
    assert f"VILA-U: loading {SMALL} from" in server.log_text() and "quantize int8" in server.log_text()


def test_unload_node_passes_the_answer_on_and_frees_the_weights(server):
    graph = {"1": loader(LARGER), "2": EMPTY, "3": qa(["1", 0], ["2", 0])}
    server.run(graph, timeout=180)
    loaded = rss(server)
    loads = server.log_text().count(f"VILA-U: loading {LARGER} from")
    graph["4"] = {"class_type": "VILAU_UnloadModel", "inputs": {"model": ["1", 0], "value": ["3", 0]}}
    graph["5"] = {"class_type": "VILAU_UnloadModel", "inputs": {"model": ["1", 0]}}  # nothing to pass on
    entry = server.run(graph, timeout=180)
    time.sleep(0.5)
    assert "released" in ui_text(entry, "4")
    assert server.log_text().count(f"VILA-U: released {LARGER}") >= 1
    # the weights (about 110 MB) left the process: measured drop 100+ MB
    assert loaded - rss(server) > 60 * 2**20, (loaded, rss(server))
    # the next run loads the model again, from disk
    server.run({"1": loader(LARGER), "2": EMPTY, "3": qa(["1", 0], ["2", 0], "and now?")}, timeout=180)
    assert server.log_text().count(f"VILA-U: loading {LARGER} from") == loads + 1


def test_keep_loaded_off_frees_after_each_use(server):
    released = server.log_text().count(f"VILA-U: released {SMALL}")
    graph = {"1": loader(keep_loaded=False), "2": EMPTY, "3": qa(["1", 0], ["2", 0], "keep it?")}
    server.run(graph, timeout=180)
    assert server.log_text().count(f"VILA-U: released {SMALL}") == released + 1
