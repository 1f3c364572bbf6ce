"""Build the workflow templates in example_workflows/ through ComfyUI's own front end.

    .venv/bin/python -m dev.scripts.build_workflows [--thumbnails-only | --no-thumbnails]

Starts the pinned ComfyUI (.cache/comfyui) with this pack and a small random
VILA-U model, opens the real front end in headless Chromium, creates every
template's nodes and links with the graph API (as a person would on the canvas),
and writes what the front end saves (`app.graph.serialize()`, UI format) to
example_workflows/<name>.json. Widget values come from the TEMPLATES below; everything
else (slot layout, widget order, control_after_generate's extra value) is the
front end's own. Then each template is run from the front end with the small
model and a screenshot of the canvas becomes example_workflows/<name>.jpg (the template
browser shows <name>.jpg for templates of custom nodes).

Run it again after a node's inputs change; tests/comfyui/test_workflows.py says when.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from dev.comfy_harness import browser as comfy_browser
from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api

REPO = Path(__file__).resolve().parents[2]

WORKFLOWS = REPO / "example_workflows"
DEFAULT_MODEL = "mit-han-lab/vila-u-7b-256"
EXAMPLE_IMAGE = "vila-u-example.png"  # example_inputs/: the pack installs them into the input folder
EXAMPLE_VIDEO = "vila-u-example.mp4"
SECOND_IMAGE = "vila-u-example-2.png"
MASKED_IMAGE = "vila-u-example-masked.png"  # vila-u-example.png's scene with a painted (transparent) square
CAPTION_FOLDER = workflow_api.CAPTION_FOLDER
SD_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
UPSCALE_MODEL = "RealESRGAN_x4plus.pth"
# model files the pack does not ship: name, url, folder. The front end's missing-model dialog
# (newer front ends) offers the download from a node's properties.models
MODEL_FILES = {
    SD_CHECKPOINT: ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                    "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints"),
    CONTROLNET: ("https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                 "control_v11p_sd15_canny_fp16.safetensors", "controlnet"),
    UPSCALE_MODEL: ("https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
                    "upscale_models"),
}
GAP = 50  # graph units between nodes, above a title bar: room for front ends that draw widgets taller
EDIT_SAMPLING = {"negative_prompt": "", "cfg": 3.0, "seed": 42, "control_after_generate": "fixed", "batch_size": 1}

LOADER = {"type": "VILAU_ModelLoader", "widgets": {"model": DEFAULT_MODEL, "dtype": "auto", "device": "auto",
                                                   "quantize": "none", "keep_loaded": True,
                                                   "download_if_missing": True}}


def node(type_, pos, widgets=None, **extra):
    return {"type": type_, "pos": pos, "widgets": widgets or {}, **extra}


def preset_text(preset: str) -> str:
    """A preset's question, shown in the question box (used when the preset is switched to custom)."""
    from vilau_backend.decoding.prompts import preset_question

    return preset_question(preset, "", "image")


def model_node(type_, pos, widget: str, file: str, **extra):
    """A loader of a model file the pack does not ship, with the file's download in properties.models."""
    url, directory = MODEL_FILES[file]
    return node(type_, pos, {widget: file}, sd=True,
                models=[{"name": file, "url": url, "directory": directory}], **extra)


def stitch(pos, title):
    return node("ImageStitch", pos, {"direction": "right", "match_image_size": True, "spacing_width": 8,
                                     "spacing_color": "white"}, title=title)


# key: {type, pos, widgets: {name: value}, title?, size?, mode?, sd?}; links: (from key, output, to key, input).
# sd: the node needs a model file this ComfyUI does not ship (SD checkpoint, ControlNet, upscaler);
# tests mute those nodes.
TEMPLATES = {
    "VILA-U 06 Text to Image, Upscaled": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 120]},
            "t2i": node("VILAU_TextToImage", [420, 120], {
                "prompt": "a photo of a red fox sitting in fresh snow, golden hour, sharp focus",
                "negative_prompt": "", "cfg": 3.0, "seed": 42, "control_after_generate": "randomize",
                "batch_size": 1}),
            "preview": node("PreviewImage", [880, 60], size=[300, 300]),
            "upscale": node("ImageScaleBy", [880, 420], {"upscale_method": "lanczos", "scale_by": 2.0}),
            "save": node("SaveImage", [1220, 120], {"filename_prefix": "VILA-U/text_to_image"}, size=[420, 440]),
            "note": node("Note", [40, 380], {"text": (
                "VILA-U Text to Image makes 256x256 images (vila-u-7b-256) or 384x384 (vila-u-7b-384), one grid "
                "position at a time: the node shows 'position i / n' and a preview while it works.\n\n"
                "Upscale Image By doubles the size (lanczos). For a model upscaler, put "
                "Load Upscale Model + Upscale Image (using Model) in its place.\n\n"
                "The model loader downloads mit-han-lab/vila-u-7b-256 (about 14 GB) into models/vila-u "
                "on first use unless it is there already.")}, size=[340, 220]),
        },
        "links": [("loader", "model", "t2i", "model"), ("t2i", "image", "preview", "images"),
                  ("t2i", "image", "upscale", "image"), ("upscale", "IMAGE", "save", "images")],
    },
    "VILA-U 01 Image Q&A": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 80]},
            "image": node("LoadImage", [40, 300], {"image": EXAMPLE_IMAGE}, size=[320, 360]),
            "qa": node("VILAU_ImageQA", [420, 80], {
                "question": "Describe the image in detail.", "preset": "custom", "batch_mode": "one answer per image",
                "seed": 0, "control_after_generate": "fixed", "max_new_tokens": 512, "do_sample": True},
                size=[420, 560]),
            "note": node("Note", [880, 80], {"text": (
                "Load an image, ask a question. The answer appears on the VILA-U Image Q&A node while it is "
                "written and stays there; the node's answer output is a STRING (a list: one per image of a "
                "batch) for other nodes.\n\ndo_sample off (greedy) gives the same answer every time.")},
                size=[320, 180]),
        },
        "links": [("loader", "model", "qa", "model"), ("image", "IMAGE", "qa", "image")],
    },
    "VILA-U 05 Caption to Stable Diffusion": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 80]},
            "image": node("LoadImage", [40, 300], {"image": EXAMPLE_IMAGE}, size=[320, 360]),
            "qa": node("VILAU_ImageQA", [400, 80], {
                "question": preset_text("Stable Diffusion prompt"), "preset": "Stable Diffusion prompt",
                "batch_mode": "one answer per image", "seed": 0, "control_after_generate": "fixed",
                "max_new_tokens": 77, "do_sample": False}, size=[400, 560]),
            "ckpt": model_node("CheckpointLoaderSimple", [860, 80], "ckpt_name", SD_CHECKPOINT),
            "positive": node("CLIPTextEncode", [1220, 80], {"text": ""}, title="CLIP Text Encode (caption)",
                             size=[400, 120], sd=True),
            "negative": node("CLIPTextEncode", [1220, 260], {"text": "blurry, low quality, watermark, text"},
                             title="CLIP Text Encode (negative)", size=[400, 160], sd=True),
            "latent": node("EmptyLatentImage", [860, 300], {"width": 512, "height": 512, "batch_size": 1},
                           sd=True),
            "sampler": node("KSampler", [1660, 80], {
                "seed": 0, "control_after_generate": "randomize", "steps": 20, "cfg": 7.0,
                "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, sd=True),
            "decode": node("VAEDecode", [2000, 80], sd=True),
            "save": node("SaveImage", [2000, 200], {"filename_prefix": "VILA-U/caption_to_sd"}, size=[420, 440],
                         sd=True),
            "note": node("Note", [400, 680], {"text": (
                "VILA-U captions the image; the caption is the positive prompt of a Stable Diffusion 1.5 "
                "pipeline (the group on the right). Choose your SD checkpoint in Load Checkpoint "
                "(models/checkpoints). The Image Q&A answer output is a list, so with a batch of images "
                "the SD part runs once per caption.")}, size=[400, 160]),
        },
        "links": [("loader", "model", "qa", "model"), ("image", "IMAGE", "qa", "image"),
                  ("qa", "answer", "positive", "text"),
                  ("ckpt", "CLIP", "positive", "clip"), ("ckpt", "CLIP", "negative", "clip"),
                  ("ckpt", "MODEL", "sampler", "model"), ("positive", "CONDITIONING", "sampler", "positive"),
                  ("negative", "CONDITIONING", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
                  ("sampler", "LATENT", "decode", "samples"), ("ckpt", "VAE", "decode", "vae"),
                  ("decode", "IMAGE", "save", "images")],
        "groups": [{"title": "Stable Diffusion 1.5: needs a checkpoint in models/checkpoints", "sd": True}],
    },
    "VILA-U 02 Two-Image Q&A": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 80]},
            "image": node("LoadImage", [40, 300], {"image": EXAMPLE_IMAGE}, size=[300, 340],
                          title="Load Image (first)"),
            "image_2": node("LoadImage", [40, 680], {"image": SECOND_IMAGE}, size=[300, 340],
                            title="Load Image (second)"),
            "qa": node("VILAU_ImageQA", [400, 80], {
                "question": "What is different between the first image and the second?", "preset": "custom",
                "batch_mode": "one answer about all images", "seed": 0, "control_after_generate": "fixed",
                "max_new_tokens": 512, "do_sample": False}, size=[420, 640]),
            "note": node("Note", [860, 80], {"text": (
                "One question about two images: image and image_2 each take their own image slot of the "
                "prompt, in order (image_3 and image_4 take more). With any of them connected the node gives "
                "one answer about all the images.")}, size=[320, 160]),
        },
        "links": [("loader", "model", "qa", "model"), ("image", "IMAGE", "qa", "image"),
                  ("image_2", "IMAGE", "qa", "image_2")],
    },
    "VILA-U 04 Caption a Folder": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 80]},
            "caption": node("VILAU_CaptionFolder", [420, 80], {
                "folder": CAPTION_FOLDER, "question": preset_text("short caption"), "preset": "short caption",
                "existing_captions": "skip", "prefix": "", "suffix": "", "recursive": False, "seed": 0,
                "control_after_generate": "fixed", "max_new_tokens": 128, "do_sample": False}, size=[440, 640]),
            "note": node("Note", [40, 340], {"text": (
                "Captions every image of a folder and writes '<image name>.txt' beside each (the layout LoRA "
                "trainers read); the node shows the captions as they are written, then a summary (also its "
                "summary output). folder: a path under ComfyUI's input folder (or an absolute one inside input or "
                "output; other folders only where the server's configuration allows them, see README). prefix/suffix "
                "add trigger words as typed ('ohwx, '). existing_captions 'skip' resumes an interrupted run; "
                "Cancel never leaves a half-written file.")}, size=[340, 200]),
        },
        "links": [("loader", "model", "caption", "model")],
    },
    "VILA-U 03 Video Q&A": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 80]},
            "video": node("LoadVideo", [40, 300], {"file": EXAMPLE_VIDEO}, size=[440, 480]),
            "qa": node("VILAU_VideoQA", [420, 80], {
                "question": "Describe the video in detail.", "preset": "custom", "seed": 0,
                "control_after_generate": "fixed",
                "max_new_tokens": 512, "do_sample": True}, size=[420, 560]),
            "note": node("Note", [880, 80], {"text": (
                "Load a video (upload it in Load Video), ask a question. The model looks at 8 evenly spaced "
                "frames; only those are decoded. An IMAGE batch of frames (e.g. from a video loader of "
                "another pack) connects to the frames input instead.")}, size=[320, 180]),
        },
        "links": [("loader", "model", "qa", "model"), ("video", "VIDEO", "qa", "video")],
    },
    "VILA-U 07 Text to Video": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 120]},
            "t2v": node("VILAU_TextToVideo", [420, 120], {
                "prompt": "fireworks exploding in the night sky over a city", "negative_prompt": "", "cfg": 3.0,
                "seed": 7, "control_after_generate": "randomize", "batch_size": 1, "frames": 8, "fps": 8.0}),
            "save": node("SaveVideo", [900, 120], {"filename_prefix": "video/VILA-U", "format": "mp4",
                                                    "codec": "h264"}, size=[400, 420]),
            "note": node("Note", [40, 380], {"text": (
                "VILA-U Text to Video makes 8 frames (256x256 with vila-u-7b-256) one grid position after "
                "another; the node shows 'position i / n'. Save Video writes an H.264 mp4 to "
                "output/video/. The frames output is an IMAGE batch for image nodes.")}, size=[340, 180]),
        },
        "links": [("loader", "model", "t2v", "model"), ("t2v", "video", "save", "video")],
    },
    "VILA-U 10 RQ-VAE Round Trip and Blend": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 60]},
            "image_a": node("LoadImage", [40, 280], {"image": EXAMPLE_IMAGE}, size=[300, 340],
                            title="Load Image (A)"),
            "image_b": node("LoadImage", [40, 660], {"image": SECOND_IMAGE}, size=[300, 340],
                            title="Load Image (B)"),
            "encode_a": node("VILAU_RQVAEEncode", [400, 280], title="VILA-U RQ-VAE Encode (A)"),
            "encode_b": node("VILAU_RQVAEEncode", [400, 660], title="VILA-U RQ-VAE Encode (B)"),
            "decode_a": node("VILAU_RQVAEDecode", [760, 120], title="VILA-U RQ-VAE Decode (round trip)"),
            "blend": node("LatentBlend", [760, 460], {"blend_factor": 0.5}),
            "decode_blend": node("VILAU_RQVAEDecode", [1080, 460], title="VILA-U RQ-VAE Decode (blend)"),
            "save_a": node("SaveImage", [1120, 40], {"filename_prefix": "VILA-U/rqvae_round_trip"},
                           size=[320, 360]),
            "save_blend": node("SaveImage", [1480, 420], {"filename_prefix": "VILA-U/rqvae_blend"},
                               size=[320, 360]),
            "note": node("Note", [400, 860], {"text": (
                "RQ-VAE Encode turns an image into VILA-U's residual-quantized latent, RQ-VAE Decode turns it "
                "back (the round trip shows what the model's codes keep). Latent Blend mixes the two latents "
                "(blend_factor: share of A); core latent nodes compose with these latents because decoding "
                "reads their samples.")}, size=[340, 180]),
        },
        "links": [("loader", "model", "encode_a", "model"), ("loader", "model", "encode_b", "model"),
                  ("loader", "model", "decode_a", "model"), ("loader", "model", "decode_blend", "model"),
                  ("image_a", "IMAGE", "encode_a", "image"), ("image_b", "IMAGE", "encode_b", "image"),
                  ("encode_a", "latent", "decode_a", "latent"), ("encode_a", "latent", "blend", "samples1"),
                  ("encode_b", "latent", "blend", "samples2"), ("blend", "LATENT", "decode_blend", "latent"),
                  ("decode_a", "image", "save_a", "images"), ("decode_blend", "image", "save_blend", "images")],
    },
    "VILA-U 08 Inpaint": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 60]},
            "image": node("LoadImage", [40, 280], {"image": MASKED_IMAGE}, size=[320, 380]),
            "inpaint": node("VILAU_Inpaint", [400, 60], {
                "prompt": "a red hot-air balloon in the sky", **EDIT_SAMPLING,
                "mask_threshold": 0.5, "grow_mask": 0, "feather": 8}, size=[400, 520]),
            "save": node("SaveImage", [840, 60], {"filename_prefix": "VILA-U/inpaint"}, size=[360, 400]),
            "region": node("MaskToImage", [840, 500]),
            "preview": node("PreviewImage", [1080, 500], size=[240, 260], title="Regenerated positions"),
            "note": node("Note", [40, 700], {"text": (
                "Paint what to regenerate: right-click Load Image -> Open in MaskEditor (this example image "
                "comes with a painted square). VILA-U regenerates every grid position (16 px of the 256 px "
                "model) that is at least mask_threshold masked, keeps the codes of all others, and pastes the "
                "original pixels back outside with a feathered edge.")}, size=[320, 200]),
        },
        "links": [("loader", "model", "inpaint", "model"), ("image", "IMAGE", "inpaint", "image"),
                  ("image", "MASK", "inpaint", "mask"), ("inpaint", "image", "save", "images"),
                  ("inpaint", "regenerated", "region", "mask"), ("region", "IMAGE", "preview", "images")],
    },
    "VILA-U 09 Variations by Depth": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 60]},
            "image": node("LoadImage", [40, 280], {"image": EXAMPLE_IMAGE}, size=[300, 340]),
            "encode": node("VILAU_RQVAEEncode", [380, 280]),
            "decode": node("VILAU_RQVAEDecode", [380, 420], title="VILA-U RQ-VAE Decode (source)"),
            **{f"vary_{k}": node("VILAU_VaryByDepth", [720, 40 + 420 * i], {
                "prompt": "a landscape painting", **EDIT_SAMPLING, "strength": strength},
                title=f"VILA-U Variations ({strength})", size=[360, 380])
               for i, (k, strength) in enumerate([("25", 0.25), ("50", 0.5), ("75", 0.75)])},
            "stitch_1": stitch([1140, 60], "Image Stitch (source | 0.25)"),
            "stitch_2": stitch([1140, 300], "Image Stitch (| 0.5)"),
            "stitch_3": stitch([1140, 540], "Image Stitch (| 0.75)"),
            "save": node("SaveImage", [1480, 60], {"filename_prefix": "VILA-U/variations"}, size=[520, 300]),
            "note": node("Note", [40, 680], {"text": (
                "Variations by residual depth: each grid position is a stack of codes from coarse to fine. "
                "strength 0.25 keeps 3 of the 4 depths of the 256 px model, 0.5 keeps 2, 0.75 keeps 1; the "
                "rest are resampled under the prompt. Side by side: source, then the three strengths.")},
                size=[320, 180]),
        },
        "links": [("loader", "model", "encode", "model"), ("loader", "model", "decode", "model"),
                  ("image", "IMAGE", "encode", "image"), ("encode", "latent", "decode", "latent"),
                  *[link for k in ("25", "50", "75") for link in
                    [("loader", "model", f"vary_{k}", "model"), ("encode", "latent", f"vary_{k}", "latent")]],
                  ("decode", "image", "stitch_1", "image1"), ("vary_25", "image", "stitch_1", "image2"),
                  ("stitch_1", "IMAGE", "stitch_2", "image1"), ("vary_50", "image", "stitch_2", "image2"),
                  ("stitch_2", "IMAGE", "stitch_3", "image1"), ("vary_75", "image", "stitch_3", "image2"),
                  ("stitch_3", "IMAGE", "save", "images")],
    },
    "VILA-U 11 Text to Image to ControlNet": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 60]},
            "t2i": node("VILAU_TextToImage", [40, 280], {
                "prompt": "a lighthouse on a rocky coast at sunset", "negative_prompt": "", "cfg": 3.0,
                "seed": 42, "control_after_generate": "randomize", "batch_size": 1}, size=[360, 420]),
            "scale": node("ImageScale", [440, 60], {"upscale_method": "lanczos", "width": 512, "height": 512,
                                                    "crop": "disabled"}),
            "canny": node("Canny", [440, 260], {"low_threshold": 0.2, "high_threshold": 0.5}),
            "edges": node("PreviewImage", [440, 420], size=[260, 280], title="Canny edges"),
            "ckpt": model_node("CheckpointLoaderSimple", [760, 60], "ckpt_name", SD_CHECKPOINT),
            "cnet": model_node("ControlNetLoader", [760, 220], "control_net_name", CONTROLNET),
            "positive": node("CLIPTextEncode", [760, 340], {"text": "a lighthouse on a rocky coast at sunset, "
                                                                    "oil painting"},
                             title="CLIP Text Encode (positive)", size=[360, 120], sd=True),
            "negative": node("CLIPTextEncode", [760, 500], {"text": "blurry, low quality"},
                             title="CLIP Text Encode (negative)", size=[360, 120], sd=True),
            "apply": node("ControlNetApplyAdvanced", [1160, 60], {"strength": 0.8, "start_percent": 0.0,
                                                                   "end_percent": 0.8}, sd=True),
            "latent": node("EmptyLatentImage", [1160, 300], {"width": 512, "height": 512, "batch_size": 1}, sd=True),
            "sampler": node("KSampler", [1500, 60], {
                "seed": 0, "control_after_generate": "randomize", "steps": 20, "cfg": 7.0,
                "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, sd=True),
            "decode": node("VAEDecode", [1840, 60], sd=True),
            "save": node("SaveImage", [1840, 180], {"filename_prefix": "VILA-U/controlnet"}, size=[400, 420],
                         sd=True),
            "note": node("Note", [440, 740], {"text": (
                "VILA-U composes the picture; its Canny edges steer a Stable Diffusion 1.5 ControlNet that "
                "re-renders it. Pick your SD 1.5 checkpoint (models/checkpoints) and a Canny ControlNet "
                "(models/controlnet) in the group on the right.")}, size=[360, 160]),
        },
        "links": [("loader", "model", "t2i", "model"), ("t2i", "image", "scale", "image"),
                  ("scale", "IMAGE", "canny", "image"), ("canny", "IMAGE", "edges", "images"),
                  ("ckpt", "CLIP", "positive", "clip"), ("ckpt", "CLIP", "negative", "clip"),
                  ("positive", "CONDITIONING", "apply", "positive"), ("negative", "CONDITIONING", "apply", "negative"),
                  ("cnet", "CONTROL_NET", "apply", "control_net"), ("canny", "IMAGE", "apply", "image"),
                  ("ckpt", "MODEL", "sampler", "model"), ("apply", "positive", "sampler", "positive"),
                  ("apply", "negative", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
                  ("sampler", "LATENT", "decode", "samples"), ("ckpt", "VAE", "decode", "vae"),
                  ("decode", "IMAGE", "save", "images")],
        "groups": [{"title": "Stable Diffusion 1.5 + ControlNet: needs a checkpoint and a Canny ControlNet",
                    "sd": True}],
    },
    "VILA-U 12 Text to Image, Model Upscale": {
        "nodes": {
            "loader": {**LOADER, "pos": [40, 60]},
            "t2i": node("VILAU_TextToImage", [40, 280], {
                "prompt": "a photo of a red fox sitting in fresh snow, golden hour, sharp focus",
                "negative_prompt": "", "cfg": 3.0, "seed": 42, "control_after_generate": "randomize",
                "batch_size": 1}, size=[360, 420]),
            "preview": node("PreviewImage", [440, 300], size=[280, 300]),
            "upscaler": model_node("UpscaleModelLoader", [440, 60], "model_name", UPSCALE_MODEL),
            "upscale": node("ImageUpscaleWithModel", [780, 60], sd=True),
            "save": node("SaveImage", [780, 180], {"filename_prefix": "VILA-U/model_upscale"}, size=[420, 440],
                         sd=True),
            "note": node("Note", [40, 740], {"text": (
                "VILA-U's 256 px image through an upscale model (ESRGAN-style, e.g. RealESRGAN_x4plus, in "
                "models/upscale_models): pick yours in Load Upscale Model.")}, size=[360, 120]),
        },
        "links": [("loader", "model", "t2i", "model"), ("t2i", "image", "preview", "images"),
                  ("t2i", "image", "upscale", "image"), ("upscaler", "UPSCALE_MODEL", "upscale", "upscale_model"),
                  ("upscale", "IMAGE", "save", "images")],
        "groups": [{"title": "Needs an upscale model in models/upscale_models", "sd": True}],
    },
}

BUILD_JS = """
(spec) => {
    const graph = window.app.graph;
    graph.clear();
    const made = {};
    for (const [key, n] of Object.entries(spec.nodes)) {
        const node = LiteGraph.createNode(n.type);
        if (!node) throw new Error('unknown node type ' + n.type);
        if (n.title) node.title = n.title;
        graph.add(node);
        node.pos = n.pos;
        for (const [name, value] of Object.entries(n.widgets)) {
            const widget = node.widgets?.find(w => w.name === name);
            if (!widget) throw new Error(n.type + ' has no widget ' + name);
            widget.value = value;
        }
        if (n.models) node.properties.models = n.models;
        // never smaller than what shows every widget (a smaller node hides its last widgets)
        const need = node.computeSize();
        node.setSize([Math.max(n.size?.[0] ?? 0, need[0]), Math.max(n.size?.[1] ?? 0, need[1])]);
        made[key] = node;
    }
    for (const [from, output, to, input] of spec.links) {
        const src = made[from], dst = made[to];
        const out = src.findOutputSlot(output), inp = dst.findInputSlot(input);
        if (out < 0 || inp < 0) throw new Error(`no slot ${from}.${output} (${out}) -> ${to}.${input} (${inp})`);
        if (!src.connect(out, dst, inp)) throw new Error(`could not connect ${from}.${output} -> ${to}.${input}`);
    }
    separate(Object.values(made), spec.gap);
    for (const g of spec.groups || []) {
        const inside = Object.entries(spec.nodes).filter(([k, n]) => n.sd).map(([k]) => made[k]);
        const x0 = Math.min(...inside.map(n => n.pos[0])) - 20, y0 = Math.min(...inside.map(n => n.pos[1])) - 80;
        const x1 = Math.max(...inside.map(n => n.pos[0] + n.size[0])) + 20;
        const y1 = Math.max(...inside.map(n => n.pos[1] + n.size[1])) + 20;
        const group = new LiteGraph.LGraphGroup(g.title);
        group.pos = [x0, y0];
        group.size = [x1 - x0, y1 - y0];
        graph.add(group);
    }
    graph.setDirtyCanvas(true, true);
    return Object.fromEntries(Object.entries(made).map(([k, n]) => [k, n.id]));

    // The positions in TEMPLATES say where a node goes; its real size is known only here. Columns
    // (nodes with the same x) move right past wider nodes before them that they would touch, then
    // each node moves down, top to bottom, until it is `gap` clear of every node placed before it
    // (title bars included).
    function separate(nodes, gap) {
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        const top = n => n.pos[1] - title, bottom = n => n.pos[1] + n.size[1];
        // whether two nodes come within g of each other across (their x spans), along (their y spans), both
        const across = (a, b, g) => a.pos[0] < b.pos[0] + b.size[0] + g && b.pos[0] < a.pos[0] + a.size[0] + g;
        const along = (a, b, g) => top(a) < bottom(b) + g && top(b) < bottom(a) + g;
        const meets = (a, b, g) => across(a, b, g) && along(a, b, g);
        const columns = [...new Set(nodes.map(n => n.pos[0]))].sort((a, b) => a - b);
        const byColumn = columns.map(x => nodes.filter(n => n.pos[0] === x));
        byColumn.forEach((column, i) => {
            const before = byColumn.slice(0, i).flat();
            const rows = m => column.some(n => along(n, m, gap));
            const right = Math.max(-Infinity, ...before.filter(rows).map(m => m.pos[0] + m.size[0] + gap));
            if (right > column[0].pos[0]) column.forEach(n => { n.pos = [right, n.pos[1]]; });
        });
        const placed = [];
        for (const node of [...nodes].sort((a, b) => a.pos[1] - b.pos[1] || a.pos[0] - b.pos[0])) {
            let other;
            while ((other = placed.find(m => meets(node, m, gap)))) {
                node.pos = [node.pos[0], bottom(other) + gap + title];
            }
            placed.push(node);
        }
    }
}
"""


def tidy(workflow: dict, ds: dict) -> dict:
    """Drop the null fields the serializer writes for unset slot options (the front end fills them in)."""

    def clean(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    for n in workflow["nodes"]:
        for key in [k for k, v in n.items() if v is None]:
            del n[key]
        n["inputs"] = [clean(s) for s in n.get("inputs", [])]
        n["outputs"] = [clean(s) for s in n.get("outputs", [])]
    for key in [k for k, v in workflow.items() if v is None]:
        del workflow[key]
    workflow.pop("id", None)
    workflow["extra"] = {"ds": ds}  # the view it opens with: everything on screen
    return workflow


def build(page: comfy_browser.ComfyPage, spec: dict) -> dict:
    ids = page.evaluate(BUILD_JS, {**spec, "gap": GAP})
    page.fit_view(max_scale=0.9)
    ds = page.evaluate("() => ({scale: window.app.canvas.ds.scale, offset: Array.from(window.app.canvas.ds.offset)})")
    ds = {"scale": round(ds["scale"], 3), "offset": [round(v, 1) for v in ds["offset"]]}
    workflow = tidy(page.serialize(), ds)
    sd_ids = [ids[k] for k, n in spec["nodes"].items() if n.get("sd")]
    if sd_ids:  # which nodes need model files not shipped here (SD, ControlNet, upscaler): tests mute them
        workflow["extra"]["vila_u"] = {"needs_model_files": sd_ids}
    return workflow


def thumbnail(page: comfy_browser.ComfyPage, server: cs.ComfyServer, name: str, workflow: dict, model: str) -> Path:
    """Run the template from the front end with the small random model; the canvas screenshot becomes <name>.jpg."""
    from PIL import Image

    page.load_workflow(workflow)
    for n in page.nodes():
        if n["type"] == "VILAU_ModelLoader":
            page.set_widget(n["id"], "model", model)
        if n["type"] in ("VILAU_ImageQA", "VILAU_VideoQA", "VILAU_CaptionFolder"):
            page.set_widget(n["id"], "max_new_tokens", 24)
    page.set_mode(workflow_api.model_node_ids(workflow), workflow_api.MODE_NEVER)
    server.wait(page.queue(), timeout=600)
    page.page.wait_for_timeout(1500)  # previews load
    page.dismiss_toasts()
    focus = thumbnail_nodes(workflow)
    page.fit_view(left=70, top=80, margin=10, only=focus)
    shot = page.screenshot(name)
    out = WORKFLOWS / f"{name}.jpg"
    with Image.open(shot) as im:
        left, top, right, bottom = page.nodes_box(only=focus)
        im = im.convert("RGB").crop((max(60, left), max(70, top), min(im.width, right), min(im.height, bottom)))
        im.thumbnail((640, 400))
        im.save(out, quality=72, optimize=True)
    return out


def thumbnail_nodes(workflow: dict) -> list[int]:
    """The nodes a thumbnail shows, large enough to read at a card's size: the pack's nodes (the loader
    aside) and the nodes wired straight to them, except model loaders we don't ship and notes."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    skip = set(workflow_api.model_node_ids(workflow)) | {i for i, n in nodes.items()
                                                        if n["type"] in ("Note", "VILAU_ModelLoader")}
    ours = {i for i, n in nodes.items() if n["type"].startswith("VILAU_") and i not in skip}
    wired = {end for link in workflow["links"] for end in (link[1], link[3]) if {link[1], link[3]} & ours}
    return sorted((ours | wired) - skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-thumbnails", action="store_true")
    parser.add_argument("--thumbnails-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (screenshots, logs)")
    parser.add_argument("--only", action="append", choices=sorted(TEMPLATES), help="build only this template (repeat)")
    args = parser.parse_args()

    run = Path(tempfile.mkdtemp(prefix="vilau-build-workflows-"))
    small = "vila-u-small"
    server = cs.pack_server(run, small)
    comfy_browser.write_quiet_settings(server.user_dir)
    server.start()
    try:
        if server.import_failed(cs.PACK):
            raise SystemExit(server.log_tail())
        with comfy_browser.ComfyPage(server.url, screenshot_dir=run / "shots") as page:
            for name, spec in TEMPLATES.items():
                if args.only and name not in args.only:
                    continue
                path = WORKFLOWS / f"{name}.json"
                if args.thumbnails_only:
                    workflow = json.loads(path.read_text(encoding="utf-8"))
                else:
                    page.reload()  # a fresh page: sizes must not carry over from the template before
                    workflow = build(page, spec)
                    path.write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
                    print(f"wrote {path.relative_to(REPO)}")
                if not args.no_thumbnails:
                    print(f"wrote {thumbnail(page, server, name, workflow, small).relative_to(REPO)}")
    finally:
        server.stop()
        if args.keep:
            print(f"run folder: {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
