"""The workflow templates in example_workflows/ against a real ComfyUI 0.3.75 with this pack loaded.

Each template (UI format, as the front end saves it) must only use nodes that
/object_info lists, connect outputs to inputs of the same type, and carry widget
values the inputs accept (combo values from the list, numbers within min/max).
Then it is converted to an API-format prompt (dev/comfy_harness/workflow_api.py, checked
against the front end's own conversion in tests/comfyui/test_browser.py) and queued with
a small random model swapped in for the published one; its outputs are checked.
The Stable Diffusion, ControlNet and upscale-model parts of some templates need
model files that do not exist here: they are muted (left out of the prompt), as
a person without them would do; their nodes, links and widget values are still
checked against /object_info.

When a node's inputs change, rebuild the templates with
`.venv/bin/python -m dev.scripts.build_workflows` from the repository root.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

PACK = cs.PACK
SMALL = "vila-u-small"  # 64 px images, an 8x8 grid
WORKFLOWS = cs.REPO_ROOT / "example_workflows"
TEMPLATES = {
    "VILA-U 06 Text to Image, Upscaled": "text-to-image with an upscale step",
    "VILA-U 01 Image Q&A": "image Q&A",
    "VILA-U 05 Caption to Stable Diffusion": "caption an image, feed the caption into a Stable Diffusion pipeline",
    "VILA-U 02 Two-Image Q&A": "one question about two images",
    "VILA-U 04 Caption a Folder": "caption a folder of images into .txt files",
    "VILA-U 03 Video Q&A": "video Q&A",
    "VILA-U 07 Text to Video": "text-to-video saved as mp4",
    "VILA-U 10 RQ-VAE Round Trip and Blend": "RQ-VAE round trip with a latent blend",
    "VILA-U 08 Inpaint": "inpaint a painted mask",
    "VILA-U 09 Variations by Depth": "variations at three strengths, side by side",
    "VILA-U 11 Text to Image to ControlNet": "VILA-U composition -> Canny -> ControlNet -> Stable Diffusion",
    "VILA-U 12 Text to Image, Model Upscale": "text-to-image through an upscale model",
}
# templates with nodes that need model files not shipped here (muted in the runs below)
NEEDS_MODEL_FILES = {
    "VILA-U 05 Caption to Stable Diffusion", "VILA-U 11 Text to Image to ControlNet",
    "VILA-U 12 Text to Image, Model Upscale",
}
DEFAULT_MODEL = "mit-han-lab/vila-u-7b-256"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# model files a template may name although this ComfyUI has none (no SD checkpoint here)
REPLACEABLE_MODEL_FILES = {
    ("CheckpointLoaderSimple", "ckpt_name"), ("ControlNetLoader", "control_net_name"),
    ("UpscaleModelLoader", "model_name"),
}
# nodes with the pack's answer box (web/js/vilau.js QA_NODES): it saves its text after the input widgets
ANSWER_BOX_NODES = {"VILAU_ImageQA", "VILAU_VideoQA", "VILAU_CaptionFolder"}
SHORT_ANSWERS = {"max_new_tokens": 16}  # the small random model rarely ends an answer by itself


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def node_label(node: dict) -> str:
    return f"node {node['id']} ({node['type']})"


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = cs.pack_server(tmp_path_factory.mktemp("workflows_run"), SMALL)
    srv.start(timeout=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    assert not server.import_failed(PACK), server.log_tail()
    return server.object_info()


# ---- the set of templates ---------------------------------------------------------------


def test_every_template_is_there_with_a_small_thumbnail():
    found = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert found == sorted(TEMPLATES), f"example_workflows/ has {found}, expected {sorted(TEMPLATES)}"
    for name in TEMPLATES:
        thumb = WORKFLOWS / f"{name}.jpg"  # the template browser asks extensions' templates for <name>.jpg
        assert thumb.is_file(), f"{thumb} missing"
        assert thumb.stat().st_size < 60_000, f"{thumb} is {thumb.stat().st_size} bytes; keep thumbnails small"
        with open(thumb, "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff", f"{thumb} is not a JPEG"


def test_comfyui_lists_the_templates_and_serves_them(server):
    listed = server.get("/workflow_templates").json()
    assert sorted(listed.get(PACK, [])) == sorted(TEMPLATES), listed
    for name in TEMPLATES:
        body = server.get(f"/api/workflow_templates/{PACK}/{name}.json").json()
        assert body["nodes"], name
        thumb = server.get(f"/api/workflow_templates/{PACK}/{name}.jpg")
        assert thumb.headers["Content-Type"] == "image/jpeg"


# ---- each template against /object_info ------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_nodes_exist(object_info, name):
    workflow = load(name)
    unknown = [node_label(n) for n in workflow["nodes"]
               if n["type"] not in wa.VIRTUAL_NODES and n["type"] not in object_info]
    assert not unknown, f"{name}: node types ComfyUI does not have: {unknown}"
    assert any(n["type"].startswith("VILAU_") for n in workflow["nodes"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_links_connect_outputs_to_inputs_of_the_same_type(object_info, name):
    workflow = load(name)
    graph = wa.Graph(workflow)
    for link_id, (_, origin, origin_slot, target, target_slot, link_type) in graph.links.items():
        src, dst = graph.nodes[int(origin)], graph.nodes[int(target)]
        out_types = object_info[src["type"]]["output"]
        assert origin_slot < len(out_types), f"{name} link {link_id}: {node_label(src)} has no output {origin_slot}"
        out_type = out_types[origin_slot]
        in_slot = dst["inputs"][target_slot]
        specs = wa.input_specs(object_info[dst["type"]])
        assert in_slot["name"] in specs, f"{name} link {link_id}: {node_label(dst)} has no input {in_slot['name']!r}"
        in_type = wa.spec_type(specs[in_slot["name"]])
        assert out_type == link_type, f"{name} link {link_id}: output type {out_type}, link says {link_type}"
        assert in_type in (out_type, "*"), (
            f"{name} link {link_id}: {node_label(src)} output {origin_slot} ({out_type}) goes to "
            f"{node_label(dst)} input {in_slot['name']!r} ({in_type})"
        )
        # both ends agree with the link table, as the front end keeps them
        assert in_slot["link"] == link_id, (name, link_id, in_slot)
        assert link_id in src["outputs"][origin_slot]["links"], (name, link_id, src["outputs"][origin_slot])


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_widget_values_are_valid_for_the_inputs(object_info, name):
    workflow = load(name)
    for node in workflow["nodes"]:
        if node["type"] in wa.VIRTUAL_NODES:
            continue
        info = object_info[node["type"]]
        widgets = wa.widget_inputs(info)
        specs = dict((n, s) for n, s, _ in widgets)
        uploads = sum(1 for _, s, _ in widgets if wa.spec_options(s).get("image_upload")
                      or wa.spec_options(s).get("video_upload"))
        answer_box = 1 if node["type"] in ANSWER_BOX_NODES else 0
        expected = len(widgets) + sum(1 for _, _, c in widgets if c) + uploads + answer_box
        assert len(node.get("widgets_values") or []) == expected, (
            f"{name} {node_label(node)}: {len(node.get('widgets_values') or [])} widget values, the node's "
            f"widgets {[n for n, _, _ in widgets]} make {expected}"
        )
        for control in wa.control_values(node, info).values():
            assert control in CONTROL_VALUES, f"{name} {node_label(node)}: control_after_generate {control!r}"
        for input_name, value in wa.widget_values(node, info).items():
            problem = widget_problem(node["type"], input_name, specs[input_name], value)
            assert problem is None, f"{name} {node_label(node)} {input_name}={value!r}: {problem}"


def widget_problem(node_type: str, name: str, spec: list, value) -> str | None:
    kind, options = wa.spec_type(spec), wa.spec_options(spec)
    if kind == "COMBO":
        choices = wa.combo_values(spec)
        if value in choices or (node_type, name) in REPLACEABLE_MODEL_FILES:
            return None
        return f"not one of {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else "not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else "not a string"
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return "not an integer"
    if kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return "not a number"
    if "min" in options and value < options["min"]:
        return f"below min {options['min']}"
    if "max" in options and value > options["max"]:
        return f"above max {options['max']}"
    return None


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_gives_every_required_input(object_info, name):
    workflow = load(name)
    muted = set(wa.model_node_ids(workflow))
    prompt = wa.to_api(workflow, object_info)  # nothing muted: the whole graph as its author meant it
    for node_id, entry in prompt.items():
        required = object_info[entry["class_type"]]["input"].get("required", {})
        missing = [n for n in required if n not in entry["inputs"]]
        assert not missing, f"{name} node {node_id} ({entry['class_type']}) lacks {missing}"
    assert muted <= {int(i) for i in prompt}, "needs_model_files names nodes that are not in the template"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_the_published_256_model_by_default(name):
    loaders = wa.nodes_of_type(load(name), "VILAU_ModelLoader")
    assert len(loaders) == 1, f"{name}: one model loader shared by all VILA-U nodes"
    model, dtype, device, download, quantize, keep_loaded, compile = loaders[0]["widgets_values"]
    assert (model, dtype, device, download, quantize, keep_loaded, compile) == (
        DEFAULT_MODEL, "auto", "auto", True, "none", True, "auto")


def test_templates_that_need_model_files_say_which_nodes():
    model_types = {"CheckpointLoaderSimple", "KSampler", "VAEDecode", "CLIPTextEncode", "EmptyLatentImage",
                   "ControlNetLoader", "ControlNetApplyAdvanced", "UpscaleModelLoader", "ImageUpscaleWithModel"}
    for name in TEMPLATES:
        workflow = load(name)
        needs = {n["id"] for n in workflow["nodes"] if n["type"] in model_types}
        listed = set(wa.model_node_ids(workflow))
        assert needs <= listed, f"{name}: nodes {needs - listed} are not in extra.vila_u.needs_model_files"
        assert bool(listed) == (name in NEEDS_MODEL_FILES), name


# where the front end's missing-model dialog downloads from (it refuses other hosts), and the folders
MODEL_SOURCES = ("https://huggingface.co/", "https://github.com/xinntao/Real-ESRGAN/releases/")
MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet",
                 "UpscaleModelLoader": "upscale_models"}


def test_loaders_of_model_files_not_shipped_say_where_to_download_them():
    loaders = 0
    for name in TEMPLATES:
        for n in load(name)["nodes"]:
            if n["type"] not in MODEL_FOLDERS:
                continue
            loaders += 1
            [model] = n.get("properties", {}).get("models", [])
            file = n["widgets_values"][0]
            assert model["name"] == file and model["url"].endswith("/" + file), (name, model)
            assert model["url"].startswith(MODEL_SOURCES) and model["directory"] == MODEL_FOLDERS[n["type"]], model
    assert loaders == 4  # two SD checkpoints, a ControlNet, an upscale model


def test_converter_reads_control_after_generate_as_no_input(object_info):
    workflow = load("VILA-U 01 Image Q&A")
    qa = wa.nodes_of_type(workflow, "VILAU_ImageQA")[0]
    inputs = wa.to_api(workflow, object_info)[str(qa["id"])]["inputs"]
    assert inputs["seed"] == qa["widgets_values"][2]
    assert inputs["max_new_tokens"] == qa["widgets_values"][4]  # after the seed's "fixed"
    assert "control_after_generate" not in inputs
    assert inputs["model"] == [str(wa.nodes_of_type(workflow, "VILAU_ModelLoader")[0]["id"]), 0]


def test_converter_feeds_the_caption_into_the_clip_text_widget(object_info):
    workflow = load("VILA-U 05 Caption to Stable Diffusion")
    prompt = wa.to_api(workflow, object_info)
    qa_id = str(wa.nodes_of_type(workflow, "VILAU_ImageQA")[0]["id"])
    captions = [e for e in prompt.values() if e["class_type"] == "CLIPTextEncode" and e["inputs"]["text"] == [qa_id, 0]]
    assert len(captions) == 1, prompt
    muted = wa.to_api(workflow, object_info, muted=set(wa.model_node_ids(workflow)))
    assert sorted(e["class_type"] for e in muted.values()) == ["LoadImage", "VILAU_ImageQA", "VILAU_ModelLoader"]


# ---- each template runs -----------------------------------------------------------------


def run_template(server, object_info, name: str) -> tuple[dict, dict, dict]:
    """Queue the template with the small random model; returns (workflow, prompt, history entry)."""
    workflow = load(name)
    overrides = wa.model_overrides(workflow, SMALL, VILAU_ImageQA=SHORT_ANSWERS, VILAU_VideoQA=SHORT_ANSWERS,
                                   VILAU_CaptionFolder=SHORT_ANSWERS)
    prompt = wa.to_api(workflow, object_info, overrides, muted=set(wa.model_node_ids(workflow)))
    entry = server.run(prompt, timeout=300)
    return workflow, prompt, entry


def ids_of(workflow: dict, node_type: str) -> list[str]:
    return [str(n["id"]) for n in wa.nodes_of_type(workflow, node_type)]


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_text_to_image_template_saves_the_upscaled_image(server, object_info):
    workflow, _, entry = run_template(server, object_info, "VILA-U 06 Text to Image, Upscaled")
    (save,) = ids_of(workflow, "SaveImage")
    (preview,) = ids_of(workflow, "PreviewImage")
    saved = server.output_files(entry, save)
    assert len(saved) == 1 and saved[0].is_file(), entry["outputs"]
    assert saved[0].relative_to(server.output_dir).parts[0] == "VILA-U"
    assert image_size(saved[0]) == (128, 128)  # the small model's 64 px, upscaled 2x
    assert [image_size(p) for p in server.output_files(entry, preview)] == [(64, 64)]


@pytest.mark.parametrize("name, qa_type", [("VILA-U 01 Image Q&A", "VILAU_ImageQA"),
                                           ("VILA-U 03 Video Q&A", "VILAU_VideoQA")])
def test_qa_templates_answer_on_the_node(server, object_info, name, qa_type):
    workflow, _, entry = run_template(server, object_info, name)
    (qa,) = ids_of(workflow, qa_type)
    answers = server.ui_text(entry, qa)
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0].strip(), entry["outputs"]


def test_two_image_template_asks_one_question_about_both(server, object_info):
    workflow, prompt, entry = run_template(server, object_info, "VILA-U 02 Two-Image Q&A")
    (qa,) = ids_of(workflow, "VILAU_ImageQA")
    first, second = ids_of(workflow, "LoadImage")
    assert prompt[qa]["inputs"]["image"] == [first, 0] and prompt[qa]["inputs"]["image_2"] == [second, 0]
    answers = server.ui_text(entry, qa)
    assert len(answers) == 1 and answers[0].strip(), entry["outputs"]


def test_caption_folder_template_writes_a_caption_beside_each_example_image(server, object_info):
    folder = server.input_dir / wa.CAPTION_FOLDER
    for old in folder.glob("*.txt"):
        old.unlink()
    workflow, _, entry = run_template(server, object_info, "VILA-U 04 Caption a Folder")
    (node,) = ids_of(workflow, "VILAU_CaptionFolder")
    assert server.ui_text(entry, node)[0].startswith(f"2 caption(s) written in {folder},"), entry["outputs"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "lighthouse.png", "lighthouse.txt", "night_city.png", "night_city.txt"]
    assert all(p.read_text(encoding="utf-8").strip() for p in folder.glob("*.txt"))


def test_caption_template_captions_with_the_sd_part_muted(server, object_info):
    workflow, prompt, entry = run_template(server, object_info, "VILA-U 05 Caption to Stable Diffusion")
    (qa,) = ids_of(workflow, "VILAU_ImageQA")
    assert server.ui_text(entry, qa) and server.ui_text(entry, qa)[0].strip()
    assert not {"CheckpointLoaderSimple", "KSampler", "SaveImage"} & {e["class_type"] for e in prompt.values()}


def test_text_to_video_template_saves_an_mp4(server, object_info):
    import av

    workflow, _, entry = run_template(server, object_info, "VILA-U 07 Text to Video")
    (save,) = ids_of(workflow, "SaveVideo")
    files = server.output_files(entry, save)
    assert len(files) == 1 and files[0].suffix == ".mp4" and files[0].is_file(), entry["outputs"]
    with av.open(str(files[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)


def test_rqvae_template_saves_round_trip_and_blend(server, object_info):
    import numpy as np
    from PIL import Image

    workflow, _, entry = run_template(server, object_info, "VILA-U 10 RQ-VAE Round Trip and Blend")
    saves = {n.get("title") or n["widgets_values"][0]: str(n["id"]) for n in wa.nodes_of_type(workflow, "SaveImage")}
    by_prefix = {n["widgets_values"][0]: str(n["id"]) for n in wa.nodes_of_type(workflow, "SaveImage")}
    assert len(saves) == 2
    pictures = {}
    for prefix, node_id in by_prefix.items():
        (path,) = server.output_files(entry, node_id)
        assert image_size(path) == (64, 64), prefix
        with Image.open(path) as im:
            pictures[prefix] = np.asarray(im.convert("RGB"), dtype=np.float32)
    round_trip, blend = pictures["VILA-U/rqvae_round_trip"], pictures["VILA-U/rqvae_blend"]
    assert np.abs(round_trip - blend).mean() > 1.0, "blending with a second image changed nothing"


def test_inpaint_template_regenerates_the_painted_square(server, object_info):
    import numpy as np
    from PIL import Image

    workflow, _, entry = run_template(server, object_info, "VILA-U 08 Inpaint")
    (save,) = ids_of(workflow, "SaveImage")
    (region,) = ids_of(workflow, "PreviewImage")
    [path] = server.output_files(entry, save)
    assert image_size(path) == (64, 64)
    [mask] = server.output_files(entry, region)
    with Image.open(mask) as im:
        regenerated = np.asarray(im.convert("L")) > 127
    # the painted square (rows 32..95, columns 32..127 of 256) covers grid rows 1..2 and columns 1..3 of 8
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:3, 1:4] = True
    assert np.array_equal(regenerated[::8, ::8], expected)


def test_variations_template_saves_source_and_three_strengths_side_by_side(server, object_info):
    workflow, _, entry = run_template(server, object_info, "VILA-U 09 Variations by Depth")
    (save,) = ids_of(workflow, "SaveImage")
    [path] = server.output_files(entry, save)
    assert image_size(path) == (4 * 64 + 3 * 8, 64)  # four 64 px panels, 8 px apart


@pytest.mark.parametrize("name", ["VILA-U 11 Text to Image to ControlNet", "VILA-U 12 Text to Image, Model Upscale"])
def test_templates_needing_model_files_run_their_vila_u_part(server, object_info, name):
    workflow, prompt, entry = run_template(server, object_info, name)
    (preview,) = ids_of(workflow, "PreviewImage")
    [path] = server.output_files(entry, preview)
    assert image_size(path) == ((512, 512) if name == "VILA-U 11 Text to Image to ControlNet" else (64, 64))
    assert not {"KSampler", "UpscaleModelLoader"} & {e["class_type"] for e in prompt.values()}


# ---- README -----------------------------------------------------------------------------


def test_readme_node_table_names_every_node_and_input(object_info):
    readme = (cs.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("(`", 1)[1].split("`)", 1)[0]: line for line in readme.splitlines()
            if line.startswith("| **VILA-U")}
    for node_id, info in object_info.items():
        if not node_id.startswith("VILAU_"):
            continue
        assert node_id in rows, f"README's node table has no row for {node_id}"
        row = rows[node_id]
        missing = [n for n in wa.input_specs(info) if f"`{n}`" not in row and node_id != "VILAU_TextToVideo"]
        assert not missing, f"README's row for {node_id} does not name the inputs {missing}"
        missing_out = [n for n in info["output_name"] if f"`{n}`" not in row]
        assert not missing_out, f"README's row for {node_id} does not name the outputs {missing_out}"


def test_readme_lists_every_template_and_the_two_commands():
    readme = (cs.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for name in TEMPLATES:
        assert f"`{name}`" in readme, f"README does not list the template {name}"
    fresh = readme.split("## Two commands on a fresh machine", 1)[1]
    commands = [line.strip() for line in fresh.splitlines() if line.startswith("    ") and line.strip()]
    assert commands == ["bash dev/scripts/demo.sh", "bash dev/scripts/run_tests.sh"], commands
    for command in commands:
        assert (cs.REPO_ROOT / command.split()[1]).is_file()
