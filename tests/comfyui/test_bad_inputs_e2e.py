"""What a hostile or unlucky user sends, through a real ComfyUI's API.

One server for the module, with this pack, two small random models of the same geometry but other
weights, one with a corrupt tokenizer, and HF_ENDPOINT pointing at a loopback listener that
accepts connections and never answers (a dead proxy), with huggingface_hub's metadata
timeout set to 3 s. Messages are asserted as the person at the canvas reads them."""

from __future__ import annotations

import json
import shutil
import time
import uuid

import numpy as np
import pytest

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa
from dev.comfy_harness.silent_hub import SilentListener

SMALL = "vila-u-small-64"
OTHER = "vila-u-small-other"  # same channels and grid as SMALL, other weights
BROKEN_TOKENIZER = "vila-u-broken-tokenizer"
HUB_TIMEOUT_S = 3

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass


@pytest.fixture(scope="module")
def silent_hub():
    listener = SilentListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, silent_hub):
    from PIL import Image

    from vilau_backend.testing.random_checkpoint import write_random_checkpoint

    run = tmp_path_factory.mktemp("run")
    models = run / "models" / "vila-u"
    small = write_random_checkpoint(models / SMALL)
    write_random_checkpoint(models / OTHER, seed=3)
    broken = shutil.copytree(small, models / BROKEN_TOKENIZER)
    (broken / "llm" / "tokenizer.model").write_bytes(b"this is not a sentencepiece model" * 8)
    env = {"OMP_NUM_THREADS": "1", "HF_ENDPOINT": silent_hub.url, "HF_HUB_ETAG_TIMEOUT": str(HUB_TIMEOUT_S)}
    srv = cs.ComfyServer(cs.comfyui_dir(), run, {cs.PACK: cs.REPO_ROOT}, env=env, offline=False)
    srv.start(timeout=180)
    pixels = np.random.default_rng(1).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(srv.input_dir / "noise.png")
    yield srv
    srv.stop()


def loader(model=SMALL, dtype="fp32"):
    return wa.loader_node(model, dtype=dtype, download_if_missing=True)


def t2i(model_ref, **changes):
    inputs = {"model": model_ref, "prompt": "a red fox", "negative_prompt": "", "cfg": 3.0, "seed": 1,
              "batch_size": 1, "temperature": 1.0, "top_k": 900, "top_p": 0.96}
    return {"class_type": "VILAU_TextToImage", "inputs": {**inputs, **changes}}


def preview(images_ref):
    return {"class_type": "PreviewImage", "inputs": {"images": images_ref}}


def failure(server, graph, node: str, timeout: float = 120) -> str:
    """Run a graph that must fail at `node`; its exception message."""
    with pytest.raises(cs.ExecutionFailed) as caught:
        server.run(graph, timeout=timeout)
    assert caught.value.error["node_id"] == node, caught.value.error
    return caught.value.error["exception_message"]


def queue_raw_json(server, graph) -> str:
    """POST /prompt with Python's JSON (NaN and Infinity allowed), as any client can send it;
    requests refuses to encode them. Returns the prompt id; PromptRejected if validation refused it."""
    body = json.dumps({"prompt": graph, "prompt_id": str(uuid.uuid4())})
    reply = server.session.post(f"{server.url}/prompt", data=body, headers={"Content-Type": "application/json"})
    if reply.status_code != 200:
        answer = reply.json()
        raise cs.PromptRejected(answer.get("error"), answer.get("node_errors"), reply.status_code)
    return reply.json()["prompt_id"]


# ---- downloads on a network that never answers ----------------------------------------------


def test_cancel_during_a_hung_download_takes_effect_within_2_s_and_the_next_run_works(server, silent_hub):
    graph = {"1": loader("mit-han-lab/vila-u-7b-256"), "2": t2i(["1", 0]), "3": preview(["2", 0])}
    with server.websocket() as ws:
        pid = server.queue(graph, client_id=ws.client_id)
        ws.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") == "1", timeout=60)
        time.sleep(1.0)  # the loader now waits on the silent hub (it would time out after 3 s)
        connections = len(silent_hub.connections)
        cancelled = time.monotonic()
        server.interrupt()
        ws.wait_for(lambda m: m.get("type") == "execution_interrupted", timeout=30)
        latency = time.monotonic() - cancelled
    entry = server.wait(pid, timeout=30, check=False)
    assert cs.was_interrupted(entry), entry["status"]
    assert connections >= 1, "the loader never reached the hub"
    assert latency < 2.0, f"Cancel took {latency:.2f} s"
    entry = server.run({"1": loader(), "2": t2i(["1", 0]), "3": preview(["2", 0])}, timeout=180)
    assert len(server.output_files(entry, "3")) == 1


def test_a_hung_download_times_out_with_a_clear_error(server):
    started = time.monotonic()
    message = failure(server, {"1": loader("mit-han-lab/vila-u-7b-384"), "2": t2i(["1", 0]),
                               "3": preview(["2", 0])}, "1")
    elapsed = time.monotonic() - started
    assert f"could not download mit-han-lab/vila-u-7b-384 into {server.models_dir / 'vila-u' / 'vila-u-7b-384'}" \
        in message
    assert f"the hub did not answer within {HUB_TIMEOUT_S} s" in message and "HTTPS_PROXY" in message
    assert "hf download mit-han-lab/vila-u-7b-384" in message
    assert elapsed < 60, f"the {HUB_TIMEOUT_S} s timeout took {elapsed:.0f} s to surface"


# ---- models and latents ----------------------------------------------------------------------


def test_a_corrupt_tokenizer_names_the_file(server):
    message = failure(server, {"1": loader(BROKEN_TOKENIZER), "2": t2i(["1", 0]), "3": preview(["2", 0])}, "1")
    path = server.models_dir / "vila-u" / BROKEN_TOKENIZER / "llm" / "tokenizer.model"
    assert f"{path} is not a sentencepiece tokenizer model" in message


def test_a_latent_of_another_model_of_the_same_geometry_is_refused(server):
    graph = {
        "1": loader(), "2": loader(OTHER),
        "3": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
        "4": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["3", 0]}},
        "5": {"class_type": "LatentBlend", "inputs": {"samples1": ["4", 0], "samples2": ["4", 0], "blend_factor": 0.5}},
        "6": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["2", 0], "latent": ["5", 0]}},
        "7": preview(["6", 0]),
    }
    message = failure(server, graph, "6")
    assert f"made by the VILA-U model '{SMALL}', whose codebooks differ from those of '{OTHER}'" in message
    graph["6"]["inputs"]["model"] = ["1", 0]  # the model that made it: the blend decodes
    assert len(server.output_files(server.run(graph, timeout=120), "7")) == 1


# ---- generation settings sent through the API ---------------------------------------------------


@pytest.mark.parametrize("name", ["cfg", "temperature"])
def test_nan_sampling_settings_are_refused_by_name(server, name):
    pid = queue_raw_json(server, {"1": loader(), "2": t2i(["1", 0], **{name: float("nan")}), "3": preview(["2", 0])})
    entry = server.wait(pid, timeout=120, check=False)
    error = cs.execution_error(entry)
    assert error is not None and error["node_id"] == "2", entry["status"]
    assert error["exception_message"].strip() == f"{name} must be a finite number, got nan"


def test_infinite_cfg_is_rejected_before_running(server):
    with pytest.raises(cs.PromptRejected) as caught:
        queue_raw_json(server, {"1": loader(), "2": t2i(["1", 0], cfg=float("inf")), "3": preview(["2", 0])})
    assert "cfg" in str(caught.value) and "inf" in str(caught.value)


def test_a_too_long_negative_prompt_is_reported_as_the_negative_prompt(server):
    graph = {"1": loader(), "2": t2i(["1", 0], negative_prompt="apple " * 9000), "3": preview(["2", 0])}
    message = failure(server, graph, "2")
    assert message.startswith("negative prompt (") and "shorten the negative prompt" in message


# ---- dtype on the CPU ---------------------------------------------------------------------------


def test_bf16_on_the_cpu_says_it_is_slow_on_the_node_and_in_the_log(server):
    with server.websocket() as ws:
        server.run({"1": loader(dtype="bf16"), "2": t2i(["1", 0]), "3": preview(["2", 0])}, client_id=ws.client_id,
                   timeout=180)
        texts = ws.progress_texts("1")
    expected = "VILA-U: bfloat16 on the CPU is 30-50x slower than float32"
    assert any(text.startswith(expected) for text in texts), texts
    assert expected in server.log_text()
