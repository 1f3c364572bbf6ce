"""One source for the sampling defaults: ImageSampling and TextSampling (and DEFAULT_MAX_NEW_TOKENS).

The CLI's argparse defaults and the README's node table must say what the backend does; the
nodes' defaults in /object_info are compared in tests/comfyui/test_e2e_comfyui.py (it needs ComfyUI).
"""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from vilau_backend.cli import build_parser
from vilau_backend.tasks.generate import ImageSampling
from vilau_backend.decoding.prompts import DEFAULT_NEGATIVE_PROMPT
from vilau_backend.tasks.understand import DEFAULT_MAX_NEW_TOKENS, TextSampling

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

README = (REPO / "README.md").read_text(encoding="utf-8")


def parser_defaults(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


def readme_row(node_id: str) -> str:
    [row] = [line for line in README.splitlines() if line.startswith("|") and f"(`{node_id}`)" in line]
    return row


def test_generate_flags_default_to_image_sampling():
    image = ImageSampling()
    for command in ("generate-image", "generate-video"):
        args = parser_defaults(command, "--model", "m", "--prompt", "p", "--save-dir", "d")
        assert (args["cfg"], args["temperature"], args["top_k"], args["top_p"]) == (
            image.cfg, image.temperature, image.top_k, image.top_p
        ), command
        assert args["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT


def test_describe_flags_default_to_text_sampling():
    args = parser_defaults("describe", "--model", "m", "--image", "x.png", "--query", "q")
    assert args["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS
    assert args["repetition_penalty"] == TextSampling().repetition_penalty
    # unset sampling flags stay None so that --greedy can refuse them; _describe fills in TextSampling's
    assert (args["temperature"], args["top_k"], args["top_p"]) == (None, None, None)


def test_describe_help_states_the_text_sampling_defaults(capsys):
    answers = TextSampling()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["describe", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert f"sampling temperature (default {answers.temperature})" in text
    assert f"0 = all (default {answers.top_k})" in text
    assert f"nucleus sampling threshold (default {answers.top_p})" in text


def test_readme_node_table_states_the_backend_defaults():
    image, answers = ImageSampling(), TextSampling()
    t2i = readme_row("VILAU_TextToImage")
    assert re.search(rf"`cfg` \(0–30, {image.cfg}\)", t2i), t2i
    for name in ("temperature", "top_k", "top_p"):
        assert f"`{name}` ({getattr(image, name)})" in t2i, (name, t2i)
    qa = readme_row("VILAU_ImageQA")
    assert f"`max_new_tokens` (1–4096, {DEFAULT_MAX_NEW_TOKENS})" in qa, qa
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        assert f"`{name}` ({getattr(answers, name)})" in qa, (name, qa)
    assert f"cfg {image.cfg:g}, top-k {image.top_k}, top-p {image.top_p}" in README


def test_edit_and_video_flags_default_to_the_backends_constants():
    from vilau_backend.media.video import DEFAULT_FPS
    from vilau_backend.tasks.editing import DEFAULT_FEATHER, DEFAULT_MASK_THRESHOLD, DEFAULT_STRENGTH
    from vilau_backend.tasks.generate import DEFAULT_VIDEO_FRAMES

    edit = parser_defaults("edit", "--model", "m", "--prompt", "p", "--save-dir", "d", "--image", "i", "--mode", "vary")
    assert (edit["threshold"], edit["feather"], edit["strength"]) == (
        DEFAULT_MASK_THRESHOLD, DEFAULT_FEATHER, DEFAULT_STRENGTH)
    video = parser_defaults("generate-video", "--model", "m", "--prompt", "p", "--save-dir", "d")
    assert (video["frames"], video["fps"]) == (DEFAULT_VIDEO_FRAMES, DEFAULT_FPS)


def test_the_dtype_flag_offers_the_models_dtypes():
    from vilau_backend.model.vila_u import DTYPES

    dtype = build_parser()._subparsers._group_actions[0].choices["encode"]._option_string_actions["--dtype"]
    assert dtype.choices == list(DTYPES) == ["float32", "bfloat16", "float16"]


def test_the_front_ends_custom_preset_is_the_backends_and_says_where_it_comes_from():
    from vilau_backend.decoding.prompts import CUSTOM_QUESTION

    script = (REPO / "web" / "js" / "vilau.js").read_text(encoding="utf-8")
    value, source = re.search(r'CUSTOM_PRESET = "([^"]*)"; // as (\S+) CUSTOM_QUESTION', script).groups()
    assert value == CUSTOM_QUESTION
    assert "CUSTOM_QUESTION =" in (REPO / source).read_text(encoding="utf-8"), source
