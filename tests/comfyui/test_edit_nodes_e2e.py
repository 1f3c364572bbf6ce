"""The VILA-U edit nodes (Inpaint, Variations, Continue Image, Extend Video) inside a real ComfyUI 0.3.75.

One server with the small random 64 px model (8x8 grid, depth 4). Results are read from /history,
the websocket and the output folder. Sampled codes are not compared across processes (the
server's thread count differs from this one's, and so may fp32 rounding and with it a
near-tied code); what is asserted is what an edit promises: kept codes give back the
source's pixels, regenerated ones change them.
"""

from __future__ import annotations

import numpy as np
import pytest

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

SMALL = "vila-u-small-64"
server = cs.pack_server_fixture(SMALL)
EDIT_NODES = ["VILAU_Inpaint", "VILAU_VaryByDepth", "VILAU_ContinueImage", "VILAU_ExtendVideo"]
SAMPLING = {"negative_prompt": "", "cfg": 3.0, "temperature": 1.0, "top_k": 900, "top_p": 0.96}


@pytest.fixture(scope="module")
def masked_photo(server):
    """A 64x64 noise PNG whose alpha is 0 (painted in the mask editor) over pixels 16..47 x 16..47."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rgba = np.concatenate([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                           np.full((64, 64, 1), 255, dtype=np.uint8)], axis=-1)
    rgba[16:48, 16:48, 3] = 0
    Image.fromarray(rgba, "RGBA").save(server.input_dir / "masked.png")
    return rgba[..., :3]


def loader():
    return wa.loader_node(SMALL)


def edit(node_id, prompt="a red apple", seed=1, batch_size=1, **inputs):
    return {"class_type": node_id, "inputs": {"model": ["1", 0], "prompt": prompt, "seed": seed,
                                              "batch_size": batch_size, **SAMPLING, **inputs}}


def save(ref, prefix):
    return {"class_type": "SaveImage", "inputs": {"images": ref, "filename_prefix": prefix}}


def encoded_source(prefix: str) -> dict:
    """Nodes 1..5: the model, the masked photo, its latent (3) and that latent decoded, saved (5) under
    `prefix` (a prefix of its own per graph: an output node ComfyUI has cached reports no files)."""
    return {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
        "3": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
        "4": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["3", 0]}},
        "5": save(["4", 0], prefix),
    }


def edits_of_source(prefix: str, node_id: str, *edits: dict) -> dict:
    """encoded_source(prefix), then a `node_id` edit for each dict of its inputs, each saved: the k-th
    edit is node 6 + 2k, its image saved by node 7 + 2k."""
    graph = encoded_source(f"{prefix}_source")
    for k, inputs in enumerate(edits):
        graph[str(6 + 2 * k)] = edit(node_id, **inputs)
        graph[str(7 + 2 * k)] = save([str(6 + 2 * k), 0], f"{prefix}_{k}")
    return graph


def pngs(server, entry, node_id) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for path in server.output_files(entry, node_id):
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")).astype(np.int16))
    return out


def test_edit_nodes_are_listed_with_tooltips(server):
    everything = server.object_info()
    for node_id in EDIT_NODES:
        info = everything[node_id]
        assert info["category"] == "VILA-U"
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        untipped = [name for name, spec in inputs.items() if not spec[1].get("tooltip")]
        assert not untipped, f"{node_id}: inputs without tooltip: {untipped}"
        assert info["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert everything["VILAU_Inpaint"]["output"] == ["IMAGE", "LATENT", "MASK"]
    assert everything["VILAU_Inpaint"]["input_order"]["optional"] == ["image", "latent"]
    assert everything["VILAU_ExtendVideo"]["output"] == ["IMAGE", "VIDEO", "LATENT"]
    assert everything["VILAU_ExtendVideo"]["input_order"]["optional"] == ["frames", "video", "latent"]


def test_inpaint_keeps_the_unmasked_pixels_and_regenerates_the_masked_ones(server, masked_photo):
    graph = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
        "3": edit("VILAU_Inpaint", batch_size=2, image=["2", 0], mask=["2", 1],
                  mask_threshold=0.5, grow_mask=0, feather=4),
        "4": save(["3", 0], "inpaint"),
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 2]}},
        "6": save(["5", 0], "inpaint_region"),
    }
    with server.websocket() as ws:
        entry = server.run(graph, timeout=300, client_id=ws.client_id)
        ws.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None)
        progress = [m["data"]["value"] for m in ws.of_type("progress") if m["data"]["node"] == "3"]
    first, second = pngs(server, entry, "4")
    # 64x64 source at the model's 64 px: the model view is the source itself; outside the
    # regenerated positions (pixels 16..47) and the 2x4 px feather, the source is pasted back exactly
    outside = np.ones((64, 64), dtype=bool)
    outside[8:56, 8:56] = False
    assert np.array_equal(first[outside], masked_photo[outside].astype(np.int16))
    inside = slice(20, 44)
    assert np.abs(first[inside, inside] - masked_photo[inside, inside]).mean() > 20  # noise vs another noise
    assert np.abs(first[inside, inside] - second[inside, inside]).mean() > 5  # two seeds, two inpaintings
    [region] = pngs(server, entry, "6")[:1]
    assert region[16:48, 16:48].min() == 255 and region[outside].max() == 0
    # the 2 rows kept before the first masked position are read at once, then one step per position
    assert progress[0] == 16 + 2 and progress[-1] == 64


def test_variations_at_strength_0_give_back_the_source_and_1_a_new_image(server, masked_photo):
    graph = {
        **edits_of_source("vary", "VILAU_VaryByDepth", *(dict(strength=strength, latent=["3", 0])
                                                          for strength in (0.0, 0.5, 1.0))),
        # an edit's latent decodes to its image
        "12": {"class_type": "VILAU_RQVAEDecode", "inputs": {"model": ["1", 0], "latent": ["8", 1]}},
        "13": save(["12", 0], "vary05_decoded"),
    }
    entry = server.run(graph, timeout=300)
    [source], [same], [half], [new], [half_again] = (pngs(server, entry, n) for n in ("5", "7", "9", "11", "13"))
    assert np.array_equal(same, source)  # every code kept: the same codes, decoded the same way
    assert np.abs(half_again - half).max() <= 1
    # keeping the coarse depths keeps the picture closer to the source than keeping none
    assert np.abs(half - source).mean() < np.abs(new - source).mean()
    assert np.abs(half - source).mean() > 1


def test_continue_image_keeps_everything_when_asked_and_regenerates_the_bottom(server, masked_photo):
    graph = edits_of_source("continue", "VILAU_ContinueImage", dict(keep_rows=8, image=["2", 0]),
                            dict(keep_rows=4, image=["2", 0]))
    with server.websocket() as ws:
        entry = server.run(graph, timeout=300, client_id=ws.client_id)
        ws.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None)
        progress = [m["data"]["value"] for m in ws.of_type("progress") if m["data"]["node"] == "8"]
    [source], [kept_all], [half] = (pngs(server, entry, n) for n in ("5", "7", "9"))
    assert np.abs(kept_all - source).max() <= 1  # every code kept: the source's codes, decoded alike
    # the kept rows' codes are exact (tests/backend/test_editing.py); their pixels are not compared, since the
    # small decoder's attention at grid resolution lets every position's pixels depend on all codes
    assert np.abs(half[32:] - source[32:]).mean() > 20
    # the 4 kept rows (32 positions) are read in one pass, then one step per position
    assert progress[0] == 32 and progress[-1] == 64 and len(progress) == 33, progress[:3]


def test_extend_video_keeps_the_given_frames(server):
    graph = {
        "1": loader(),
        "2": {"class_type": "VILAU_TextToVideo",
              "inputs": {"model": ["1", 0], "prompt": "waves", "seed": 3, "batch_size": 1, "frames": 2,
                         "fps": 8.0, **SAMPLING}},
        "3": save(["2", 0], "given"),
        "4": edit("VILAU_ExtendVideo", add_frames=2, fps=8.0, latent=["2", 2]),
        "5": save(["4", 0], "extended"),
        "6": {"class_type": "SaveVideo",
              "inputs": {"video": ["4", 1], "filename_prefix": "video/extended", "format": "mp4", "codec": "h264"}},
    }
    entry = server.run(graph, timeout=300)
    given, extended = pngs(server, entry, "3"), pngs(server, entry, "5")
    assert len(given) == 2 and len(extended) == 4
    for a, b in zip(given, extended[:2]):
        # same codes; decoded in a batch of 4 frames instead of 2 (CPU conv kernels depend on the batch)
        assert np.abs(a - b).max() <= 2
    assert np.abs(extended[3] - extended[1]).mean() > 5
    [mp4] = server.output_files(entry, "6")
    assert mp4.suffix == ".mp4"


def test_stale_codes_and_missing_sources_say_what_to_do(server, masked_photo):
    blend = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
        "3": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x208040}},
        "5": {"class_type": "VILAU_RQVAEEncode", "inputs": {"model": ["1", 0], "image": ["4", 0]}},
        "6": {"class_type": "LatentBlend", "inputs": {"samples1": ["3", 0], "samples2": ["5", 0], "blend_factor": 0.5}},
        "7": edit("VILAU_VaryByDepth", strength=0.5, latent=["6", 0]),
        "8": save(["7", 0], "stale"),
    }
    entry = server.wait(server.queue(blend), timeout=120, check=False)
    error = cs.execution_error(entry)
    assert error and "stale" in error["exception_message"], entry["status"]

    neither = {"1": loader(), "2": edit("VILAU_ContinueImage", keep_rows=2), "3": save(["2", 0], "none")}
    error = cs.execution_error(server.wait(server.queue(neither), timeout=120, check=False))
    assert error and "neither is connected" in error["exception_message"]


def test_cancel_during_an_edit_then_the_next_edit_runs(server, masked_photo):
    long_run = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
        "3": edit("VILAU_ExtendVideo", seed=9, add_frames=30, fps=8.0, frames=["2", 0]),
        "4": save(["3", 0], "cancelled"),
    }
    entry, stopped_after, positions = server.cancel_during_progress(long_run, "3")
    assert cs.status_str(entry) == "error" and cs.was_interrupted(entry), entry["status"]
    assert max(positions) < 31 * 64, "the video was finished before the cancel"
    assert stopped_after < 15 and not server.output_files(entry)

    again = {"1": loader(), "2": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
             "3": edit("VILAU_Inpaint", seed=9, image=["2", 0], mask=["2", 1], mask_threshold=0.5, grow_mask=1,
                       feather=0),
             "4": save(["3", 0], "after_cancel")}
    [image] = pngs(server, server.run(again, timeout=300), "4")
    assert image.shape == (64, 64, 3)
