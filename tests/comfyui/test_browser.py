"""The templates in ComfyUI's real front end, in headless Chromium (Debian's /usr/bin/chromium via Playwright).

Every template is opened as the front end opens a file (app.loadGraphData),
the model widget is switched to a small random model, and the graph is queued
from the front end (app.queuePrompt, what the Run button does); outputs are read
from /history and the output folder. The front end's API prompt must equal the
one dev/comfy_harness/workflow_api.py makes, which is what test_workflows.py and the demo
queue. The Stable Diffusion part of the caption template is muted here (mode
"never"), since there is no SD checkpoint on this machine; only the VILA-U
caption runs.

Answers must stream into the Q&A nodes' answer box while they are written, stay
there after the run, be saved in the workflow and come back after a page reload;
the generating nodes (generation and edits) must show "position i / n" (nodes/progress.py). A screenshot
of each run goes to tests/artifacts/browser/ (path printed; $VILAU_SCREENSHOTS
moves it).

Without Chromium or Playwright these tests fail with the command that installs
them (dev/scripts/run_tests.sh installs both when run as root, as CI does).
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path

import pytest

from dev.comfy_harness import browser as cb
from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

PACK = cs.PACK
SMALL = "vila-u-small"
WORKFLOWS = cs.REPO_ROOT / "example_workflows"
TEMPLATES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
SHORT_ANSWERS = {"max_new_tokens": 24}
# README figures, cropped to the nodes, from the runs with the newest front end (copy them to docs/ when
# the look of a node changes)
DOCS_FIGURES = {"VILA-U 01 Image Q&A-answer": "image-qa.jpg", "VILA-U 06 Text to Image, Upscaled": "text-to-image.jpg"}
SCREENSHOTS = Path(os.environ.get("VILAU_SCREENSHOTS", cs.REPO_ROOT / "tests" / "artifacts" / "browser"))


def browser_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install playwright)"
    if cb.chromium_path() is None:
        return "no Chromium at /usr/bin/chromium (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module", autouse=True)
def need_browser():
    reason = browser_missing()
    if reason:
        pytest.fail(f"the browser tests need a browser: {reason}", pytrace=False)


@pytest.fixture(scope="module", params=["pinned", cb.NEWEST_FRONT_END])
def front_end(request) -> str:
    """Every test runs against the pinned ComfyUI's own front end and against the newest one."""
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory, need_browser, front_end):
    srv = cs.pack_server(tmp_path_factory.mktemp("browser_run"), SMALL)
    srv.extra_args += cb.front_end_args(front_end)
    cb.write_quiet_settings(srv.user_dir)
    srv.start(timeout=180)
    assert not srv.import_failed(PACK), srv.log_tail()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def page(server, front_end):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ignore = SCREENSHOTS.parent / ".gitignore"  # screenshots are for looking at, not for committing
    if SCREENSHOTS.parent.name == "artifacts" and not ignore.exists():
        ignore.write_text("*\n", encoding="utf-8")
    with cb.ComfyPage(server.url, screenshot_dir=SCREENSHOTS / f"front-end-{front_end}") as p:
        # the front end served is the one asked for (the pinned ComfyUI's is the installed package)
        expected = metadata.version("comfyui-frontend-package") if front_end == "pinned" else front_end
        assert p.front_end_version() == expected
        record_node_texts(p)
        yield p


def record_node_texts(page) -> None:
    """Record every text sent to a node: the progress-text boxes (our positions) and the answer boxes."""
    page.evaluate(
        """() => {
            window.__vilauTexts = [];
            window.__vilauAnswers = [];
            const api = window.comfyAPI.api.api;
            api.addEventListener('progress_text',
                ({detail}) => window.__vilauTexts.push([String(detail.nodeId), detail.text]));
            api.addEventListener('vilau.answer',
                ({detail}) => window.__vilauAnswers.push([String(detail.node), detail.text]));
        }"""
    )


def shown_texts(page, node_id) -> list[str]:
    """Texts put in the front end's progress-text box of a node (positions of the generation nodes)."""
    return [text for nid, text in page.evaluate("() => window.__vilauTexts") if nid == str(node_id)]


def streamed_answers(page, node_id) -> list[str]:
    """Answers so far that the server sent to a Q&A node's answer box."""
    return [text for nid, text in page.evaluate("() => window.__vilauAnswers") if nid == str(node_id)]


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def comparable(prompt: dict, object_info: dict) -> dict:
    """class_type and inputs; inputs the node does not have (LoadVideo's "video-preview" widget, which the
    front end sends and the server ignores) left out."""
    return {
        k: {"class_type": v["class_type"],
            "inputs": {n: x for n, x in v["inputs"].items() if n in wa.input_specs(object_info[v["class_type"]])}}
        for k, v in prompt.items()
    }


def open_and_queue(page, server, object_info, name: str) -> tuple[dict, dict]:
    """Load the template in the front end, swap in the small random model, queue it; returns (workflow, history entry)."""
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    page.evaluate("() => { window.__vilauTexts = []; window.__vilauAnswers = []; }")
    page.load_workflow(workflow)
    assert not [t for t in page.toasts() if "Invalid workflow" in t], page.toasts()
    page.dismiss_toasts()
    loaded = {n["id"]: n for n in page.nodes()}
    assert sorted(loaded) == sorted(n["id"] for n in workflow["nodes"]), "the front end dropped or added nodes"

    overrides = wa.model_overrides(workflow, SMALL, VILAU_ImageQA=SHORT_ANSWERS, VILAU_VideoQA=SHORT_ANSWERS,
                                   VILAU_CaptionFolder=SHORT_ANSWERS)
    for node_id, values in overrides.items():
        for widget, value in values.items():
            page.set_widget(node_id, widget, value)
    muted = wa.model_node_ids(workflow)
    if muted:  # no SD checkpoint here: mute the Stable Diffusion part, as a person without one would
        page.set_mode(muted, wa.MODE_NEVER)

    ours = wa.to_api(workflow, object_info, overrides, muted=set(muted))
    front_end = comparable(page.api_prompt(), object_info)
    assert front_end == comparable(ours, object_info), "front end and dev/comfy_harness/workflow_api.py disagree"

    entry = server.wait(page.queue(), timeout=300)
    page.page.wait_for_timeout(800)  # the last websocket messages and previews reach the page
    return workflow, entry


def screenshot(page, name: str) -> Path:
    page.dismiss_toasts()
    page.fit_view()
    path = page.screenshot(name)
    print(f"screenshot: {path}")
    if name in DOCS_FIGURES and page.front_end_version() == cb.NEWEST_FRONT_END:
        docs_figure(page, path, SCREENSHOTS / "docs" / DOCS_FIGURES[name])
    return path


def docs_figure(page, screenshot_path: Path, dest: Path, width: int = 960) -> None:
    from PIL import Image

    with Image.open(screenshot_path) as shot:
        left, top, right, bottom = page.nodes_box()
        crop = shot.convert("RGB").crop((max(0, left), max(0, top), min(shot.width, right), min(shot.height, bottom)))
    crop = crop.resize((width, round(crop.height * width / crop.width)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    crop.save(dest, quality=85)
    print(f"README figure: {dest}")


def node_ids(workflow: dict, node_type: str) -> list[int]:
    return [n["id"] for n in wa.nodes_of_type(workflow, node_type)]


# ---- tests ------------------------------------------------------------------------------


def test_front_end_loads_the_pack_extension(page, server):
    assert "VILA-U.NodeText" in page.extensions()
    served = server.get("/extensions").json()
    assert f"/extensions/{PACK}/vilau.js" in served, served
    assert not [m for m in page.console if m.startswith("pageerror") and "vilau" in m.lower()], page.console_tail()


def test_template_browser_lists_the_templates_and_serves_them_with_thumbnails(page):
    listed = page.evaluate("async () => await window.comfyAPI.api.api.getWorkflowTemplates()")
    assert sorted(listed.get(PACK, [])) == TEMPLATES
    # fetched as the template browser fetches them: names with spaces, commas and '&' included
    served = page.evaluate(
        """async ([pack, names]) => Promise.all(names.map(async (name) => {
            const url = (ext) => window.comfyAPI.api.api.apiURL(`/workflow_templates/${pack}/${name}.${ext}`);
            const workflow = await fetch(url('json'));
            const thumbnail = await fetch(url('jpg'));
            return [name, workflow.status, (await workflow.json()).nodes.length, thumbnail.status,
                    thumbnail.headers.get('content-type')];
        }))""",
        [PACK, TEMPLATES],
    )
    for name, status, nodes, thumb_status, thumb_type in served:
        expected = len(json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))["nodes"])
        assert (status, nodes, thumb_status, thumb_type) == (200, expected, 200, "image/jpeg"), name


def overlaps(a: list[float], b: list[float]) -> float:
    """The area two boxes [x, y, w, h] share (0: none)."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, dx) * max(0.0, dy)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_opens_with_no_overlap_no_hidden_widget_and_its_inputs_there(page, name):
    page.load_workflow(json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8")))
    page.page.wait_for_timeout(500)  # DOM widgets (text boxes, previews) take their size
    layout = page.node_layout()
    touching = [(a["title"], b["title"], round(overlaps(a["box"], b["box"])))
                for i, a in enumerate(layout) for b in layout[i + 1:] if overlaps(a["box"], b["box"]) > 0]
    assert touching == [], f"{name}: nodes overlap (title, title, area): {touching}"
    # a node smaller than it needs cuts its last widgets off (a pixel of rounding allowed); a video
    # preview scales to any size, and its node never reaches what computeSize asks
    cut = [(n["title"], n["size"], n["need"]) for n in layout if not n["scales"]
           and (n["size"][0] + 1 < n["need"][0] or n["size"][1] + 1 < n["need"][1])]
    assert cut == [], f"{name}: nodes too small for their widgets (title, size, needed): {cut}"
    # the example inputs the pack installed are among Load Image's / Load Video's choices
    missing = [(n["title"], value) for n in layout if n["type"] in ("LoadImage", "LoadVideo")
               for value, choices in [next(iter(n["combos"].values()))] if value not in (choices or [])]
    assert missing == [], f"{name}: inputs not in the input folder: {missing}"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_from_the_front_end(page, server, object_info, name):
    workflow, entry = open_and_queue(page, server, object_info, name)
    outputs = entry["outputs"]
    ran = {str(n) for n in outputs}
    for node_type in ("SaveImage", "SaveVideo", "PreviewImage"):
        for node_id in node_ids(workflow, node_type):
            if node_id in wa.model_node_ids(workflow):
                assert str(node_id) not in ran, f"muted SD node {node_id} ran"
                continue
            files = server.output_files(entry, str(node_id))
            assert files and all(f.is_file() for f in files), f"{name}: {node_type} {node_id} wrote {files}"
    for qa_type in ("VILAU_ImageQA", "VILAU_VideoQA", "VILAU_CaptionFolder"):
        for node_id in node_ids(workflow, qa_type):
            answers = server.ui_text(entry, str(node_id))
            assert answers and answers[0].strip(), f"{name}: no answer from node {node_id}: {outputs}"
    screenshot(page, name)


@pytest.mark.parametrize("name, qa_type", [("VILA-U 01 Image Q&A", "VILAU_ImageQA"),
                                           ("VILA-U 03 Video Q&A", "VILAU_VideoQA")])
def test_answer_streams_into_the_answer_box_and_stays(page, server, object_info, name, qa_type):
    workflow, entry = open_and_queue(page, server, object_info, name)
    (qa,) = node_ids(workflow, qa_type)
    (answer,) = server.ui_text(entry, str(qa))

    streamed = streamed_answers(page, qa)
    partial = [t for t in streamed[:-1] if t != answer]
    assert len(partial) >= 3, f"expected the answer to grow on the node token by token, got {streamed}"
    assert all(answer.startswith(t) for t in partial), "the streamed texts are not beginnings of the answer"

    # after the run (newer front ends have removed the core progress-text boxes by now): the whole
    # answer in the node's answer box, on screen, and in the workflow the front end saves
    assert page.widget_value(qa, "answer") == answer
    assert answer in page.text_boxes(), page.text_boxes()
    saved = next(n for n in page.serialize()["nodes"] if str(n["id"]) == str(qa))
    assert saved["widgets_values"][-1] == answer, saved["widgets_values"]
    assert "answer" not in page.api_prompt()[str(qa)]["inputs"], "the answer box must not be sent with the prompt"
    path = screenshot(page, f"{name}-answer")
    assert path.is_file()

    # a page reload restores the workflow, answer included
    page.reload()
    record_node_texts(page)
    assert page.widget_value(qa, "answer") == answer
    assert answer in page.text_boxes(), page.text_boxes()


@pytest.mark.parametrize("name, node_type", [("VILA-U 06 Text to Image, Upscaled", "VILAU_TextToImage"),
                                             ("VILA-U 08 Inpaint", "VILAU_Inpaint")])
def test_generating_node_shows_positions(page, server, object_info, name, node_type):
    workflow, _ = open_and_queue(page, server, object_info, name)
    (node,) = node_ids(workflow, node_type)
    shown = shown_texts(page, node)
    positions = [tuple(map(int, m.groups())) for t in shown if (m := re.fullmatch(r"position (\d+) / (\d+)", t))]
    assert len(positions) >= 8, shown  # one per grid position of the 8x8 small model (the socket may merge a few)
    assert positions[-1] == (64, 64), positions
    assert [p for p, _ in positions] == sorted(p for p, _ in positions)


def test_answer_with_markup_shows_as_written(page):
    """An answer is shown as text: '<b>' in it is not markup."""
    page.load_workflow(json.loads((WORKFLOWS / "VILA-U 01 Image Q&A.json").read_text(encoding="utf-8")))
    qa = next(n["id"] for n in page.nodes() if n["type"] == "VILAU_ImageQA")
    page.evaluate("(id) => NODE(id).onExecuted({text: ['a <b>bold</b> & plain answer']})", qa)
    page.page.wait_for_timeout(300)
    assert "a <b>bold</b> & plain answer" in page.text_boxes()
    assert page.widget_value(qa, "answer") == "a <b>bold</b> & plain answer"


def test_answers_of_a_batch_are_numbered(page):
    page.load_workflow(json.loads((WORKFLOWS / "VILA-U 01 Image Q&A.json").read_text(encoding="utf-8")))
    qa = next(n["id"] for n in page.nodes() if n["type"] == "VILAU_ImageQA")
    page.evaluate("(id) => NODE(id).onExecuted({text: ['first', 'second']})", qa)
    assert page.widget_value(qa, "answer") == "[1] first\n\n[2] second"


def test_workflow_saved_with_the_four_input_loader_loads_with_its_values(page):
    """A workflow saved with the first release's loader (model, dtype, device, download_if_missing)
    opens with those values in place and the later inputs at their defaults."""
    workflow = json.loads((WORKFLOWS / "VILA-U 01 Image Q&A.json").read_text(encoding="utf-8"))
    loader = next(n for n in workflow["nodes"] if n["type"] == "VILAU_ModelLoader")
    loader["widgets_values"] = [SMALL, "fp32", "cpu", False]
    loader["inputs"] = [i for i in loader.get("inputs", []) if i["name"] in ("model", "dtype", "device",
                                                                             "download_if_missing")]
    page.load_workflow(workflow)
    node = loader["id"]
    values = {name: page.widget_value(node, name)
              for name in ("model", "dtype", "device", "download_if_missing", "quantize", "keep_loaded", "compile")}
    assert values == {"model": SMALL, "dtype": "fp32", "device": "cpu", "download_if_missing": False,
                      "quantize": "none", "keep_loaded": True, "compile": "auto"}


@pytest.mark.parametrize("name, qa_type", [("VILA-U 01 Image Q&A", "VILAU_ImageQA"),
                                           ("VILA-U 04 Caption a Folder", "VILAU_CaptionFolder")])
def test_workflow_saved_before_the_preset_input_loads_with_its_question_and_answer(page, name, qa_type):
    """A Q&A node saved without `preset` (its widget values end with the answer box's text) opens with
    its question, its answer in the answer box, and the preset that asks the question as typed."""
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    qa = next(n for n in workflow["nodes"] if n["type"] == qa_type)
    values = qa["widgets_values"]
    preset_at = len(values) - 2  # the preset is the last input widget, before the answer box
    old = values[:preset_at] + ["an answer saved with the workflow"]
    qa["widgets_values"] = old
    qa["inputs"] = [i for i in qa.get("inputs", []) if i["name"] != "preset"]
    page.load_workflow(workflow)
    assert page.widget_value(qa["id"], "preset") == "custom"
    assert page.widget_value(qa["id"], "answer") == "an answer saved with the workflow"
    assert page.widget_value(qa["id"], "question") == old[1 if qa_type == "VILAU_CaptionFolder" else 0]
    assert page.api_prompt()[str(qa["id"])]["inputs"]["preset"] == "custom"

