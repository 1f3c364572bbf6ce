"""Bad input to the backend gets an error that says what was wrong and what to do, and leaves
the model usable. End-to-end counterparts through ComfyUI's API are in
test_bad_inputs_e2e.py."""

from __future__ import annotations

import shutil

import pytest
import torch

from vilau_backend.errors import CheckpointError, InputError
from vilau_backend.tasks.generate import ImageSampling, generate_codes

APPLE = "a red apple on a table"


@pytest.mark.parametrize("garbage", [b"not a sentencepiece model" * 40, b""], ids=["text", "empty"])
def test_garbage_tokenizer_model_is_a_checkpoint_error_naming_the_file(tiny_checkpoint, tmp_path, garbage):
    from vilau_backend.model.vila_u import VilaUModel

    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    (broken / "llm" / "tokenizer.model").write_bytes(garbage)
    with pytest.raises(CheckpointError) as caught:
        VilaUModel.load(broken, "float32", "cpu")
    message = str(caught.value)
    assert f"{broken / 'llm' / 'tokenizer.model'} is not a sentencepiece tokenizer model" in message
    assert "download the model's llm/tokenizer.model again" in message.lower()


@pytest.mark.parametrize("name", ["cfg", "temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_sampling_settings_are_refused_by_name(tiny_model, name, value):
    with pytest.raises(InputError, match=f"{name} must be a finite number, got {value}"):
        generate_codes(tiny_model, APPLE, sampling=ImageSampling(**{name: value}))


def test_a_too_long_negative_prompt_is_reported_as_the_negative_prompt(tiny_model):
    long_text = "apple " * 9000  # 9000 tokens: more than the context (8192) holds
    with pytest.raises(InputError, match=r"^negative prompt \(\d+ tokens\) plus 64 image positions exceeds"):
        generate_codes(tiny_model, APPLE, negative_prompt=long_text)
    with pytest.raises(InputError, match=r"^prompt \(\d+ tokens\) plus 64 image positions exceeds"):
        generate_codes(tiny_model, long_text)
    # and the model still generates
    assert generate_codes(tiny_model, APPLE, sampling=ImageSampling(top_k=1)).shape == (1, 8, 8, 4)
