"""A node refuses a bad input before it asks for the model: `model.ready()` (which may load 14 GB of
weights) is never called for a value the request or the frame choice refuses. Without ComfyUI: the
node modules run against a stand-in `comfy_api` that only has to let them import and execute."""

from __future__ import annotations

import sys

import pytest
from comfy_stand_in import Anything, node_module  # noqa: F401 - node_module is a fixture

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)


def input_error() -> type:
    """InputError as the nodes raise it: the pack's backend is imported under the pack's package name."""
    import importlib

    return importlib.import_module("vilau_pack.vilau_backend.errors").InputError


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
    requests = sys.modules["vilau_pack.vilau_backend.tasks.requests"]
    assert understanding.check_question("  \n") == requests.empty_question_problem("")
    assert understanding.check_question("Why?") is True
    assert understanding.check_question(None) is True  # linked: checked by the request when the node runs
    assert understanding.check_question("", preset="short caption") is True  # the preset's question is asked


def test_the_frame_widgets_stop_at_what_the_256_px_models_context_holds(node_module):
    """frames = MAX_FRAMES runs on the 256 px model (tests/backend/test_generate.py checks the arithmetic
    against its context); Extend Video adds frames after at least one given frame."""
    generation = node_module("generation")
    published = sys.modules["vilau_pack.vilau_backend.checkpoint.published"]
    assert generation.MAX_FRAMES == published.most_published_video_frames(published.PUBLISHED_256) == 31
    assert generation.FRAMES_FIT == "up to 31 frames for the 256 px model, 11 for the 384 px one"
