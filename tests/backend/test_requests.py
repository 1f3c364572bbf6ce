"""The task requests (vilau_backend/tasks/requests.py): checked when made, before any model is
touched, and the same run whether a task is given the request or its fields as keywords."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vilau_backend.errors import InputError
from vilau_backend.tasks.editing import vary_by_depth
from vilau_backend.tasks.generate import generate_codes, generate_images
from vilau_backend.tasks.requests import AnswerRequest, EditRequest, ImageRequest, ImageSampling
from vilau_backend.tasks.understand import GREEDY, TextSampling, describe_images

APPLE = "a red apple on a wooden table"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt=""), "the prompt is empty"),
        (dict(prompt=APPLE, num_images=0), "num_images must be at least 1, got 0"),
        (dict(prompt=APPLE, frames=0), "frames must be at least 1, got 0"),
        (dict(prompt=APPLE, seed=-2), "seed must be >= 0, got -2"),
        (dict(prompt="an <image> of a cat"), "the prompt contains '<image>'"),
        (dict(prompt=APPLE, negative_prompt="<image>"), "the negative prompt contains '<image>'"),
    ],
)
def test_an_image_request_refuses_bad_values_when_made(fields, message):
    with pytest.raises(InputError, match=message):
        ImageRequest(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(question="what is in <image>?"), "the question contains '<image>', which VILA-U reserves for image inputs"),
        (dict(question="why?", system="see <image>"), "the system prompt contains '<image>'"),
        (dict(question=" \n"), "the question is empty"),
        (dict(question="why?", max_new_tokens=0), "max_new_tokens must be 1 or more, got 0"),
        (dict(question=3), "the question must be text, got int"),
        (dict(question="why?", batch_size=0), "batch_size \\(answers generated together\\) must be 1 or more, got 0"),
        (dict(question="why?", seed=2**64), "seed must lie in 0..2\\*\\*64-1"),
    ],
)
def test_an_answer_request_refuses_bad_values_when_made(fields, message):
    with pytest.raises(InputError, match=message):
        AnswerRequest(**fields)


@pytest.mark.parametrize(
    "kind, fields, message",
    [
        (ImageSampling, dict(cfg=float("nan")), "cfg must be a finite number, got nan"),
        (ImageSampling, dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (ImageSampling, dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"),
        (TextSampling, dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (TextSampling, dict(do_sample=False, repetition_penalty=float("inf")),
         "repetition_penalty must be a finite number, got inf"),
        (TextSampling, dict(top_p=float("nan")), "top_p must be a finite number, got nan"),
    ],
)
def test_sampling_settings_refuse_bad_values_when_made(kind, fields, message):
    """Both kinds of sampling settings check themselves when made, as the requests that hold them do."""
    with pytest.raises(InputError, match=message):
        kind(**fields)


def test_an_edit_request_needs_a_bool_keep_mask():
    given = torch.zeros(1, 4, 2, dtype=torch.long)
    with pytest.raises(InputError, match="keep must be a bool tensor"):
        EditRequest(ImageRequest(APPLE), given, torch.ones(1, 4, 2))


def test_requests_are_frozen():
    request = ImageRequest(APPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 3  # type: ignore[misc]


def test_a_request_and_keywords_give_the_same_codes(small_model):
    sampling = ImageSampling(temperature=0.7)
    request = ImageRequest(APPLE, num_images=2, sampling=sampling, seed=5)
    by_request = generate_codes(small_model, request)
    by_keywords = generate_codes(small_model, APPLE, num_images=2, sampling=sampling, seed=5)
    assert by_request.shape[0] == 2
    assert torch.equal(by_request, by_keywords)
    assert torch.equal(generate_images(small_model, request, decode=False).codes, by_request.cpu())


def test_an_edit_takes_its_batch_from_the_given_codes(small_model):
    codes = generate_codes(small_model, APPLE, num_images=3, seed=1)  # (3, h, w, D)
    D = codes.shape[-1]
    kept_all = vary_by_depth(small_model, ImageRequest(APPLE, seed=9), codes, D)  # num_images 1, three sources
    assert torch.equal(kept_all.codes, codes.cpu())


def test_a_request_and_keywords_together_are_refused(small_model):
    with pytest.raises(TypeError, match="not both"):
        generate_codes(small_model, ImageRequest(APPLE), seed=3)
    with pytest.raises(TypeError, match="not both"):
        describe_images(small_model, torch.rand(1, 8, 8, 3), AnswerRequest("why?"), sampling=GREEDY)
