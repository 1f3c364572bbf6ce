"""The VILA-U nodes inside a real ComfyUI 0.3.75, driven over its HTTP API.

One server for the module (``$COMFYUI_DIR``, default ``<repo>/.cache/comfyui``;
``bash .ci/install_comfyui.sh`` installs it) with this checkout as the custom
node pack ``ComfyUI-VILA-U``, two small random VILA-U checkpoints (64 px with an
8x8 grid in ``models/vila-u``, 256 px with 32x32 in a folder given by
``extra_model_paths.yaml``), and API-format graphs that mix every VILA-U node with
core nodes. Results are read from ``/history``, the websocket and the output folder;
answers and decoded pixels are compared with the backend run in this process on
the same checkpoint.
"""

from __future__ import annotations


import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

PACK = cs.PACK
SMALL = "vila-u-small-64"  # in <run>/models/vila-u
SMALL_EXTRA = "vila-u-small-256"  # in a folder listed under vila_u in extra_model_paths.yaml
NODE_IDS = [
    "VILAU_ModelLoader", "VILAU_UnloadModel", "VILAU_ImageQA", "VILAU_VideoQA", "VILAU_CaptionFolder",
    "VILAU_TextToImage",
    "VILAU_TextToVideo", "VILAU_RQVAEEncode", "VILAU_RQVAEDecode",
]
QA_ADVANCED = ["temperature", "top_k", "top_p", "repetition_penalty"]
GEN_ADVANCED = ["temperature", "top_k", "top_p"]


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

    extra = tmp_path_factory.mktemp("extra_models")
    # a 32x32 grid, 1024 positions: a text-to-image run long enough to interrupt (about 2 s on 2 idle cores)
    write_random_checkpoint(extra / "vila" / SMALL_EXTRA, CheckpointSizes(image_size=256, patch_size=8), seed=1)
    yaml = extra / "extra_model_paths.yaml"
    yaml.write_text(f"vilau_tests:\n    base_path: {extra}\n    vila_u: vila\n", encoding="utf-8")
    with cs.pack_server(tmp_path_factory.mktemp("run"), SMALL, extra_model_paths=yaml) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(server):
    """The 64 px checkpoint loaded by the backend in this process, as the server's loader does on the CPU."""
    from vilau_backend.model.vila_u import VilaUModel

    return VilaUModel.load(server.models_dir / "vila-u" / SMALL, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def input_images(server):
    """Two 48x40 noise PNGs in the input folder: {name: IMAGE (1, H, W, 3) as LoadImage makes it}."""
    from PIL import Image

    rng = np.random.default_rng(5)
    images = {}
    for name in ("noise_a.png", "noise_b.png"):
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(server.input_dir / name)
        images[name] = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]  # as LoadImage
    return images


# ---- graph pieces -----------------------------------------------------------------------


def loader(model=SMALL, download_if_missing=True, **inputs):
    return wa.loader_node(model, download_if_missing=download_if_missing, **inputs)


def qa_inputs(question, seed=0, max_new_tokens=20, greedy=True):
    return {"question": question, "seed": seed, "max_new_tokens": max_new_tokens, "do_sample": not greedy,
            "temperature": 0.9, "top_k": 50, "top_p": 0.6, "repetition_penalty": 1.0}


def t2i(model_ref, prompt="a red fox in the snow", seed=7, batch_size=1, **extra):
    return {"class_type": "VILAU_TextToImage",
            "inputs": {"model": model_ref, "prompt": prompt, "negative_prompt": "", "cfg": 3.0, "seed": seed,
                       "batch_size": batch_size, "temperature": 1.0, "top_k": 900, "top_p": 0.96, **extra}}


def save(images_ref, prefix):
    return {"class_type": "SaveImage", "inputs": {"images": images_ref, "filename_prefix": prefix}}


def messages(entry, name):
    return [data for event, data in entry["status"]["messages"] if event == name]


def cached_nodes(entry) -> set[str]:
    return {n for data in messages(entry, "execution_cached") for n in data["nodes"]}


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def as_saved(image: torch.Tensor) -> np.ndarray:
    """IMAGE (H, W, 3) -> the uint8 pixels SaveImage writes."""
    return np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)


# ---- the pack loads ---------------------------------------------------------------------


def test_pack_imported(server):
    assert not server.import_failed(PACK), server.log_tail()
    assert "Error while calling comfy_entrypoint" not in server.log_text()


def test_object_info_lists_every_node_with_tooltips(server):
    everything = server.object_info()
    for node_id in NODE_IDS:
        assert node_id in everything, f"{node_id} missing from /object_info"
        info = everything[node_id]
        assert info["category"] == "VILA-U", (node_id, info["category"])
        assert info["python_module"] == f"custom_nodes.{PACK}"
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        untipped = [name for name, spec in inputs.items() if not spec[1].get("tooltip")]
        assert not untipped, f"{node_id}: inputs without tooltip: {untipped}"

    def inputs(node_id):
        return everything[node_id]["input_order"]

    # the inputs added after the first release are optional and come last: older graphs still run
    assert inputs("VILAU_ModelLoader")["required"] == ["model", "dtype", "device", "download_if_missing"]
    assert inputs("VILAU_ModelLoader")["optional"] == ["quantize", "keep_loaded", "compile"]
    assert inputs("VILAU_UnloadModel")["required"] == ["model"]
    assert inputs("VILAU_UnloadModel")["optional"] == ["value"]
    assert inputs("VILAU_ImageQA")["required"] == [
        "model", "image", "question", "batch_mode", "seed", "max_new_tokens", "do_sample", *QA_ADVANCED]
    assert inputs("VILAU_VideoQA")["required"] == [
        "model", "question", "seed", "max_new_tokens", "do_sample", *QA_ADVANCED]
    assert inputs("VILAU_ImageQA")["optional"] == ["system_prompt", "batch_size", "image_2", "image_3", "image_4", "preset"]
    assert inputs("VILAU_VideoQA")["optional"] == [
        "frames", "video", "system_prompt", "frame_count", "frame_method", "frame_step", "start_frame", "end_frame",
        "preset"]
    assert inputs("VILAU_CaptionFolder")["required"] == [
        "model", "folder", "question", "existing_captions", "prefix", "suffix", "recursive", "seed", "max_new_tokens",
        "do_sample", *QA_ADVANCED]
    assert inputs("VILAU_CaptionFolder")["optional"] == ["system_prompt", "batch_size", "preset"]
    generation = ["model", "prompt", "negative_prompt", "cfg", "seed", "batch_size", *GEN_ADVANCED]
    assert inputs("VILAU_TextToImage")["required"] == generation
    assert inputs("VILAU_TextToVideo")["required"] == [*generation, "frames", "fps"]
    assert inputs("VILAU_RQVAEEncode")["required"] == ["model", "image"]
    assert inputs("VILAU_RQVAEDecode")["required"] == ["model", "latent"]

    outputs = {node_id: everything[node_id]["output"] for node_id in NODE_IDS}
    assert outputs == {
        "VILAU_ModelLoader": ["VILAU_MODEL"],
        "VILAU_UnloadModel": ["*"],
        "VILAU_ImageQA": ["STRING"],
        "VILAU_VideoQA": ["STRING"],
        "VILAU_CaptionFolder": ["STRING"],
        "VILAU_TextToImage": ["IMAGE", "LATENT"],
        "VILAU_TextToVideo": ["IMAGE", "VIDEO", "LATENT"],
        "VILAU_RQVAEEncode": ["LATENT"],
        "VILAU_RQVAEDecode": ["IMAGE"],
    }
    assert everything["VILAU_ImageQA"]["output_is_list"] == [True]  # one answer per image

    for node_id, knobs in [("VILAU_ImageQA", QA_ADVANCED), ("VILAU_TextToImage", GEN_ADVANCED)]:
        required = everything[node_id]["input"]["required"]
        assert required["seed"][1]["control_after_generate"] is True
        assert [k for k in required if required[k][1].get("advanced")] == knobs
    assert everything["VILAU_TextToImage"]["input"]["required"]["batch_size"][1]["max"] == 16


def test_node_defaults_are_the_backends(server):
    """Sampling defaults have one source, the backend's dataclasses (tests/nodes/test_defaults.py: CLI, README)."""
    from vilau_backend.tasks.generate import ImageSampling
    from vilau_backend.tasks.understand import DEFAULT_MAX_NEW_TOKENS, TextSampling

    def defaults(node_id: str) -> dict:
        info = server.object_info(node_id)["input"]
        return {name: spec[1].get("default") for name, spec in {**info["required"], **info.get("optional", {})}.items()}

    image, answers = ImageSampling(), TextSampling()
    for node_id in ("VILAU_TextToImage", "VILAU_TextToVideo"):
        got = defaults(node_id)
        assert {k: got[k] for k in ("cfg", *GEN_ADVANCED)} == {k: getattr(image, k) for k in ("cfg", *GEN_ADVANCED)}, node_id
    for node_id in ("VILAU_ImageQA", "VILAU_VideoQA"):
        got = defaults(node_id)
        assert got["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS, node_id
        names = ("do_sample", *QA_ADVANCED)
        assert {k: got[k] for k in names} == {k: getattr(answers, k) for k in names}, node_id


def test_loader_lists_models_folder_and_extra_model_paths(server):
    options = server.object_info("VILAU_ModelLoader")["input"]["required"]["model"][1]["options"]
    # local folders by name (both roots), then the published models
    assert options == [SMALL_EXTRA, SMALL, "mit-han-lab/vila-u-7b-256", "mit-han-lab/vila-u-7b-384"]


# ---- understanding ----------------------------------------------------------------------


def test_image_qa_answers_equal_backend_greedy_answers(server, reference, input_images):
    from vilau_backend.tasks.understand import GREEDY, describe_images

    question = "What is in the picture?"
    graph = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": "noise_a.png"}},
        "3": {"class_type": "VILAU_ImageQA",
              "inputs": {"model": ["1", 0], "image": ["2", 0], "batch_mode": "one answer per image",
                         **qa_inputs(question)}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        # a batch of two: one answer per image, each as if asked alone
        "5": {"class_type": "LoadImage", "inputs": {"image": "noise_b.png"}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["5", 0]}},
        "7": {"class_type": "VILAU_ImageQA",
              "inputs": {"model": ["1", 0], "image": ["6", 0], "batch_mode": "one answer per image",
                         **qa_inputs(question)}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
        # the same batch in one prompt: one answer about both images
        "9": {"class_type": "VILAU_ImageQA",
              "inputs": {"model": ["1", 0], "image": ["6", 0], "batch_mode": "one answer about all images",
                         **qa_inputs(question)}},
    }
    with server.websocket() as ws:
        entry = server.run(graph, timeout=120, client_id=ws.client_id)
        shown = ws.answer_texts("3")

    expected = [
        describe_images(reference, input_images[name], question, sampling=GREEDY, max_new_tokens=20)[0].text
        for name in ("noise_a.png", "noise_b.png")
    ]
    assert server.ui_text(entry, "4") == expected[:1]
    assert server.ui_text(entry, "3") == expected[:1]
    both = torch.cat([input_images["noise_a.png"], input_images["noise_b.png"]])
    # compared with the backend's batch of two (one padded pass), like with like
    each = describe_images(reference, both, question, batch=True, sampling=GREEDY, max_new_tokens=20)
    assert server.ui_text(entry, "8") == [answer.text for answer in each]
    together = describe_images(reference, both, question, sampling=GREEDY, max_new_tokens=20)
    assert server.ui_text(entry, "9") == [together[0].text]
    # the answer grew on the node token by token and ends as the answer
    assert len(shown) >= 2 and shown[-1] == expected[0], shown
    assert all(expected[0].startswith(text) for text in shown), shown


def test_text_to_video_saves_mp4_and_answers_about_its_frames(server):
    import av

    graph = {
        "1": loader(),
        "2": {"class_type": "VILAU_TextToVideo",
              "inputs": {"model": ["1", 0], "prompt": "waves on a beach", "negative_prompt": "", "cfg": 3.0,
                         "seed": 3, "batch_size": 1, "temperature": 1.0, "top_k": 900, "top_p": 0.96,
                         "frames": 3, "fps": 6.0}},
        "3": {"class_type": "SaveVideo",
              "inputs": {"video": ["2", 1], "filename_prefix": "video/t2v", "format": "mp4", "codec": "h264"}},
        "4": {"class_type": "VILAU_VideoQA",
              "inputs": {"model": ["1", 0], "frames": ["2", 0], **qa_inputs("What happens in the video?")}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "6": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["2", 2]}},
        "7": save(["6", 0], "t2v_decoded"),
    }
    with server.websocket() as ws:
        entry = server.run(graph, timeout=180, client_id=ws.client_id)
        shown = ws.answer_texts("4")

    [mp4] = server.output_files(entry, "3")
    assert mp4.suffix == ".mp4" and mp4.is_file()
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(6.0)
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
    assert len(server.output_files(entry, "7")) == 3  # the LATENT holds one entry per frame
    [answer] = server.ui_text(entry, "5")
    assert answer and shown and shown[-1] == answer

    # the saved file, loaded as a VIDEO, is asked about the same way
    name = server.put_input(mp4, "t2v_input.mp4")
    graph = {
        "1": loader(),
        "2": {"class_type": "LoadVideo", "inputs": {"file": name}},
        "3": {"class_type": "VILAU_VideoQA",
              "inputs": {"model": ["1", 0], "video": ["2", 0], **qa_inputs("What happens in the video?")}},
    }
    [from_file] = server.ui_text(server.run(graph, timeout=120), "3")
    assert from_file  # mp4 compression changes the pixels, so not necessarily the same words


# ---- generation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2i_run(server):
    """Text to image, batch of 2: saved as is, scaled by 1.5, and through its LATENT and decode."""
    graph = {
        "1": loader(),
        "2": t2i(["1", 0], batch_size=2),
        "3": save(["2", 0], "t2i_image"),
        "4": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                       "scale_by": 1.5}},
        "5": save(["4", 0], "t2i_scaled"),
        "6": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["2", 1]}},
        "7": save(["6", 0], "t2i_decoded"),
    }
    with server.websocket() as ws:
        entry = server.run(graph, timeout=180, client_id=ws.client_id)
        ws.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None)
        progress = [m["data"] for m in ws.of_type("progress") if m["data"]["node"] == "2"]
        previews = [m for m in ws.messages if m.get("type") == "binary" and m["event"] == 1]
    return entry, progress, previews


def test_text_to_image_scaled_and_saved(server, t2i_run):
    entry, _, _ = t2i_run
    files = server.output_files(entry, "5")
    assert len(files) == 2
    assert all(read_png(f).shape == (96, 96, 3) for f in files)  # 64 px x 1.5


def test_decoded_latent_equals_image_output(server, t2i_run):
    entry, _, _ = t2i_run
    images = [read_png(f) for f in server.output_files(entry, "3")]
    decoded = [read_png(f) for f in server.output_files(entry, "7")]
    assert len(images) == len(decoded) == 2
    assert images[0].shape == (64, 64, 3)
    for image, again in zip(images, decoded):
        np.testing.assert_array_equal(again, image)
    assert not np.array_equal(images[0], images[1])  # two different images in the batch


def test_text_to_image_reports_every_position_with_previews(t2i_run):
    _, progress, previews = t2i_run
    assert [p["value"] for p in progress] == list(range(1, 65)), progress[:3]
    assert {p["max"] for p in progress} == {64}
    assert len(previews) == 4  # a partial-grid preview every 2 of the 8 rows


def test_requeued_graph_is_served_from_cache_and_new_seed_reruns(server):
    graph = {"1": loader(), "2": t2i(["1", 0], seed=11), "3": {"class_type": "PreviewImage",
                                                                "inputs": {"images": ["2", 0]}}}
    first = server.run(graph, timeout=120)
    again = server.run(graph, timeout=120)
    assert {"1", "2", "3"} <= cached_nodes(again)

    graph["2"]["inputs"]["seed"] = 12
    changed = server.run(graph, timeout=120)
    assert "1" in cached_nodes(changed) and "2" not in cached_nodes(changed)
    [before] = server.output_files(first, "3")
    [after] = server.output_files(changed, "3")
    assert not np.array_equal(read_png(before), read_png(after))


def test_same_loader_options_share_one_model(server):
    loads = f"VILA-U: loading {SMALL} from {server.models_dir.resolve() / 'vila-u' / SMALL} (bfloat16, quantize none, runs on cpu)"
    log_before = server.log_text().count(loads)
    graph = {
        "1": loader(dtype="bf16"),
        "2": loader(dtype="bf16", download_if_missing=False),  # another node, same model options
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x208040}},
        "4": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["3", 0]}},
        "5": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["2", 0], "latent": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    server.run(graph, timeout=120)
    assert server.log_text().count(loads) == log_before + 1
    assert "Requested to load ModuleDict" in server.log_text()  # registered with model management


def test_api_graph_saved_before_quantize_keep_loaded_and_compile_still_runs(server):
    """The first release's loader had four inputs: such a graph runs, with the later inputs' defaults
    (the same model instance as a loader that gives them: one load, counted in the log)."""
    loads = server.log_text().count(f"VILA-U: loading {SMALL} from")
    old_loader = {"class_type": "VILAU_ModelLoader",
                  "inputs": {"model": SMALL, "dtype": "auto", "device": "auto", "download_if_missing": False}}
    graph = {
        "1": old_loader,
        "2": loader(download_if_missing=False, quantize="none", keep_loaded=True, compile="auto"),
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x804020}},
        "4": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["3", 0]}},
        "5": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["2", 0], "latent": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "old_loader"}},
    }
    entry = server.run(graph, timeout=120)
    assert len(server.output_files(entry, "6")) == 1
    assert server.log_text().count(f"VILA-U: loading {SMALL} from") <= loads + 1


def test_unload_models_releases_the_model_and_the_next_run_loads_it_again(server):
    registered = server.log_text().count("Requested to load ModuleDict")
    loads = server.log_text().count(f"VILA-U: loading {SMALL} from")
    server.free(unload_models=True, free_memory=True)
    time.sleep(0.5)  # /free only sets flags, which the idle worker picks up at once
    graph = {"1": loader(), "2": t2i(["1", 0], seed=21), "3": save(["2", 0], "after_free")}
    entry = server.run(graph, timeout=120)
    assert len(server.output_files(entry, "3")) == 1
    # gone from ComfyUI's loaded models and from memory: registered and read from disk again
    assert server.log_text().count("Requested to load ModuleDict") > registered
    assert server.log_text().count(f"VILA-U: loading {SMALL} from") == loads + 1


def test_interrupt_during_text_to_image_then_next_prompt_runs(server):
    graph = {"1": loader(SMALL_EXTRA), "2": t2i(["1", 0], seed=5), "3": save(["2", 0], "interrupted")}
    entry, stopped_after, positions = server.cancel_during_progress(graph, "2")
    assert cs.status_str(entry) == "error" and cs.was_interrupted(entry), entry["status"]
    assert max(positions) < 1024, "the image was finished before the interrupt"
    assert stopped_after < 15
    assert not server.output_files(entry)

    entry = server.run({"1": loader(SMALL_EXTRA), "2": t2i(["1", 0], seed=5, batch_size=1),
                        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}, timeout=180)
    [image] = server.output_files(entry, "3")
    assert read_png(image).shape == (256, 256, 3)


# ---- RQ-VAE -----------------------------------------------------------------------------


def test_encoded_images_blend_and_upscaled_latent_decode(server, reference, input_images):
    graph = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": "noise_a.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "noise_b.png"}},
        "4": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
        "5": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["3", 0]}},
        "6": {"class_type": "LatentBlend", "inputs": {"samples1": ["4", 0], "samples2": ["5", 0], "blend_factor": 0.3}},
        "7": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["6", 0]}},
        "8": save(["7", 0], "blend"),
        # an upscaled latent (16x16 grid) is interpolated back to the model's 8x8 grid
        "9": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["6", 0], "upscale_method": "bilinear",
                                                          "scale_by": 2.0}},
        "10": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["9", 0]}},
        "11": save(["10", 0], "blend_upscaled"),
    }
    entry = server.run(graph, timeout=120)

    a = reference.encode_images(input_images["noise_a.png"]).features
    b = reference.encode_images(input_images["noise_b.png"]).features
    expected = as_saved(reference.decode_features(a * 0.3 + b * 0.7)[0])
    [blend] = server.output_files(entry, "8")
    got = read_png(blend)
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    [upscaled] = server.output_files(entry, "11")
    assert read_png(upscaled).shape == (64, 64, 3)


# ---- what the person at the canvas is told ----------------------------------------------


def test_unknown_model_name_is_a_validation_error(server):
    graph = {"1": loader("no-such-model"), "2": t2i(["1", 0]), "3": save(["2", 0], "x")}
    with pytest.raises(cs.PromptRejected) as exc:
        server.queue(graph)
    [error] = exc.value.node_errors["1"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert "no VILA-U model named 'no-such-model'" in error["details"]
    assert str(server.models_dir / "vila-u") in error["details"]


def test_unavailable_device_says_which_are_available(server):
    graph = {"1": loader(device="cuda:7"), "2": t2i(["1", 0]), "3": save(["2", 0], "x")}
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    assert "device 'cuda:7' is not available here; choose one of: auto, cpu" in exc.value.error["exception_message"]


def test_combo_value_not_in_the_list_says_which_are(server):
    """Through the API a combo can get any value. ComfyUI 0.3.75 does not check V3 combo values, so the
    node says which values there are (newer ComfyUI refuses the prompt itself, and the node stays quiet)."""
    graph = {"1": loader(),
             "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "3": {"class_type": "VILAU_ImageQA", "inputs": {"model": ["1", 0], "image": ["2", 0],
                                                             "batch_mode": "every other image", **qa_inputs("Hi?")}}}
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    assert exc.value.error["exception_message"].strip() == (
        "batch_mode 'every other image' is not available here; "
        "choose one of: one answer per image, one answer about all images"
    )
    graph["3"]["inputs"]["batch_mode"] = "one answer per image"
    graph["1"]["inputs"]["dtype"] = "fp64"
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    assert exc.value.error["exception_message"].strip() == (
        "dtype 'fp64' is not available here; choose one of: auto, bf16, fp16, fp32"
    )


def test_empty_prompt_is_a_validation_error(server):
    graph = {"1": loader(), "2": t2i(["1", 0], prompt="  \n"), "3": save(["2", 0], "x")}
    with pytest.raises(cs.PromptRejected) as exc:
        server.queue(graph)
    [error] = exc.value.node_errors["2"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert "the prompt is empty" in error["details"]

    # a prompt that arrives through a link is only known when the graph runs
    graph["2"]["inputs"]["prompt"] = ["4", 0]
    graph["4"] = {"class_type": "PrimitiveString", "inputs": {"value": ""}}
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    assert "the prompt is empty" in exc.value.error["exception_message"]


def test_empty_question_is_a_validation_error(server):
    graph = {"1": loader(),
             "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "3": {"class_type": "VILAU_ImageQA", "inputs": {"model": ["1", 0], "image": ["2", 0],
                                                             "batch_mode": "one answer per image", **qa_inputs("")}}}
    with pytest.raises(cs.PromptRejected) as exc:
        server.queue(graph)
    [error] = exc.value.node_errors["3"]["errors"]
    assert "the question is empty" in error["details"]


def test_batch_over_the_limit_is_a_validation_error(server):
    graph = {"1": loader(), "2": t2i(["1", 0], batch_size=17), "3": save(["2", 0], "x")}
    with pytest.raises(cs.PromptRejected) as exc:
        server.queue(graph)
    [error] = exc.value.node_errors["2"]["errors"]
    assert error["type"] == "value_bigger_than_max"
    assert error["details"] == "batch_size" and "16" in error["message"]


def test_decoding_a_latent_of_another_model_says_what_to_connect(server):
    graph = {
        "1": loader(),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["2", 0]}},
        "4": save(["3", 0], "x"),
    }
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    message = exc.value.error["exception_message"]
    assert exc.value.error["node_id"] == "3"
    assert "not a VILA-U latent" in message and "1x4x64x64" in message and "64 channels" in message
    assert "VAE Decode" in message


def test_video_qa_without_a_video_says_what_to_connect(server):
    graph = {"1": loader(),
             "2": {"class_type": "VILAU_VideoQA", "inputs": {"model": ["1", 0], **qa_inputs("What happens?")}}}
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    assert "neither is connected" in exc.value.error["exception_message"]


def test_offline_download_says_which_files_go_where(server):
    graph = {"1": loader("mit-han-lab/vila-u-7b-256"), "2": t2i(["1", 0]), "3": save(["2", 0], "x")}
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    message = exc.value.error["exception_message"]
    folder = server.models_dir / "vila-u" / "vila-u-7b-256"
    assert "could not download mit-han-lab/vila-u-7b-256" in message
    assert "HF_HUB_OFFLINE" in message
    assert f'hf download mit-han-lab/vila-u-7b-256 --local-dir "{folder}"' in message
    assert "vision_tower/" in message and "mm_projector/" in message


def test_missing_published_model_without_download_says_what_to_do(server):
    graph = {"1": loader("mit-han-lab/vila-u-7b-384", download_if_missing=False), "2": t2i(["1", 0]), "3": save(["2", 0], "x")}
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.run(graph, timeout=60)
    message = exc.value.error["exception_message"]
    assert "mit-han-lab/vila-u-7b-384 is not (completely) in" in message
    assert "download_if_missing" in message
