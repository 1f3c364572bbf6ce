"""The nodes' inputs, without ComfyUI (the node modules run against a stand-in `comfy_api`,
tests/nodes/comfy_stand_in.py): a bad value is refused before the node asks for the model
(`model.ready()` may load 14 GB of weights), and the widgets' limits and defaults are the backend's."""

from __future__ import annotations

import sys

import pytest
from comfy_stand_in import Anything, node_module, pack_backend, schema_defaults  # noqa: F401 - node_module is a fixture

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)


def input_error() -> type:
    return pack_backend("errors").InputError


class NeverReady:
    """A VILAU_MODEL handle that records whether the node asked for the model."""

    compile = None
    keep_loaded = True

    def __init__(self):
        self.asked = 0

    def ready(self):
        self.asked += 1
        raise AssertionError("the node asked for the model before refusing its input")


ANSWER_INPUTS = dict(seed=0, max_new_tokens=16, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                     repetition_penalty=1.0)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(question="   "), "the question is empty"),
        (dict(max_new_tokens=0), "max_new_tokens must be 1 or more, got 0"),
        (dict(system_prompt="look at <image>"), "the system prompt contains '<image>'"),
        (dict(frame_step=0), "the frame step must be 1 or more, got 0"),
        (dict(start_frame=5, end_frame=2), "the frame window 5..2 is empty"),
    ],
)
def test_video_qa_refuses_a_bad_input_before_the_model_loads(node_module, inputs, message):
    understanding = node_module("understanding")
    model = NeverReady()
    inputs = {"question": "What happens?", **ANSWER_INPUTS, **inputs}
    with pytest.raises(input_error(), match=message):
        understanding.VideoQA.execute(model=model, video=Anything(), **inputs)
    assert model.asked == 0


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(question=""), "the question is empty"),
        (dict(max_new_tokens=-1), "max_new_tokens must be 1 or more, got -1"),
        (dict(question="what is in <image>?"), "the question contains '<image>'"),
    ],
)
def test_image_qa_refuses_a_bad_input_before_the_model_loads(node_module, inputs, message):
    import torch

    understanding = node_module("understanding")
    model = NeverReady()
    inputs = {"question": "What is it?", "batch_mode": understanding.EACH_IMAGE, **ANSWER_INPUTS, **inputs}
    with pytest.raises(input_error(), match=message):
        understanding.ImageQA.execute(model=model, image=torch.zeros(1, 8, 8, 3), **inputs)
    assert model.asked == 0


def test_the_queue_time_question_check_says_what_the_request_says(node_module):
    understanding = node_module("understanding")
    requests = pack_backend("tasks.requests")
    assert understanding.check_question("  \n") == requests.empty_question_problem("")
    assert understanding.check_question("Why?") is True
    assert understanding.check_question(None) is True  # linked: checked by the request when the node runs
    assert understanding.check_question("", preset="short caption") is True  # the preset's question is asked


def test_the_frame_widgets_stop_at_what_the_256_px_models_context_holds(node_module):
    """frames = MAX_FRAMES runs on the 256 px model (tests/backend/test_generate.py checks the arithmetic
    against its context); Extend Video adds frames after at least one given frame."""
    generation = node_module("generation")
    published = pack_backend("checkpoint.published")
    assert generation.MAX_FRAMES == published.most_published_video_frames(published.PUBLISHED_256) == 31
    assert generation.FRAMES_FIT == "up to 31 frames for the 256 px model, 11 for the 384 px one"


def test_the_nodes_defaults_are_the_backends_constants(node_module):
    generation, editing = node_module("generation"), node_module("editing")
    video, edits = pack_backend("media.video"), pack_backend("tasks.editing")
    frames = pack_backend("tasks.generate").DEFAULT_VIDEO_FRAMES
    assert schema_defaults(generation.TextToVideo)["frames"] == frames == 8  # the original's
    assert schema_defaults(generation.TextToVideo)["fps"] == schema_defaults(editing.ExtendVideo)["fps"] == video.DEFAULT_FPS
    inpaint = schema_defaults(editing.Inpaint)
    assert (inpaint["mask_threshold"], inpaint["feather"]) == (edits.DEFAULT_MASK_THRESHOLD, edits.DEFAULT_FEATHER)
    assert schema_defaults(editing.VaryByDepth)["strength"] == edits.DEFAULT_STRENGTH


def test_video_qas_frame_inputs_left_out_or_at_their_defaults_are_the_originals_choice(node_module):
    understanding = node_module("understanding")
    FrameChoice = pack_backend("media.video").FrameChoice
    assert understanding.frame_choice() == FrameChoice()  # a graph saved before the inputs existed
    defaults = {name: value for name, value in schema_defaults(understanding.VideoQA).items()
                if name in understanding.FRAME_CHOICE_FIELDS}
    assert len(defaults) == 5 and understanding.frame_choice(**defaults) == FrameChoice()
    assert understanding.frame_choice(frame_count=4, end_frame=9) == FrameChoice(count=4, end=9)


def test_an_unknown_model_gets_one_message_when_queued_and_when_run(node_module, monkeypatch, tmp_path):
    import types

    models = tmp_path / "models"
    folder_paths = types.SimpleNamespace(models_dir=str(models), get_folder_paths=lambda key: [str(models / "vila-u")])
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    loader, model_files = node_module("loader"), node_module("model_files")
    message = model_files.unknown_model("nope")
    assert message.startswith(f"no VILA-U model named 'nope' in {models / 'vila-u'}: choose one of the list")
    assert loader.ModelLoader.validate_inputs(model="nope") == message
    with pytest.raises(pack_backend("errors").CheckpointError) as raised:
        model_files.resolve_model("nope", download=True)
    assert str(raised.value) == message
    assert loader.ModelLoader.validate_inputs(model="mit-han-lab/vila-u-7b-256") is True  # downloads when run
