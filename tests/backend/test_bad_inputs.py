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
def test_garbage_tokenizer_model_is_a_checkpoint_error_naming_the_file(small_checkpoint, tmp_path, garbage):
    from vilau_backend.model.vila_u import VilaUModel

    broken = shutil.copytree(small_checkpoint, tmp_path / "broken")
    (broken / "llm" / "tokenizer.model").write_bytes(garbage)
    with pytest.raises(CheckpointError) as caught:
        VilaUModel.load(broken, "float32", "cpu")
    message = str(caught.value)
    assert f"{broken / 'llm' / 'tokenizer.model'} is not a sentencepiece tokenizer model" in message
    assert "download the model's llm/tokenizer.model again" in message.lower()


@pytest.mark.parametrize("name", ["cfg", "temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_sampling_settings_are_refused_by_name(small_model, name, value):
    with pytest.raises(InputError, match=f"{name} must be a finite number, got {value}"):
        generate_codes(small_model, APPLE, sampling=ImageSampling(**{name: value}))


def test_a_too_long_negative_prompt_is_reported_as_the_negative_prompt(small_model):
    long_text = "apple " * 9000  # 9000 tokens: more than the context (8192) holds
    with pytest.raises(InputError, match=r"^negative prompt \(\d+ tokens\) plus 64 image positions exceeds"):
        generate_codes(small_model, APPLE, negative_prompt=long_text)
    with pytest.raises(InputError, match=r"^prompt \(\d+ tokens\) plus 64 image positions exceeds"):
        generate_codes(small_model, long_text)
    # and the model still generates
    assert generate_codes(small_model, APPLE, sampling=ImageSampling(top_k=1)).shape == (1, 8, 8, 4)


# ---- text inputs too long for the context ------------------------------------------------------


def ask(model, question="Describe the image.", **options):
    from vilau_backend.tasks.understand import GREEDY, describe_images

    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    return describe_images(model, image, question, sampling=GREEDY, max_new_tokens=4, **options)


@pytest.mark.parametrize("too_long", ["system_prompt", "question"])
def test_the_text_input_that_is_too_long_is_named_with_its_token_count(small_model, too_long):
    long_text = "apple " * 9000  # 54,000 characters: fits the character bound, not the 8192-token context
    texts = {"system_prompt": "You caption images.", "question": "Describe the image.", too_long: long_text}
    counts = {name: len(small_model.tokenizer.encode(text, add_bos=False)) for name, text in texts.items()}
    with pytest.raises(InputError) as caught:
        ask(small_model, texts["question"], system=texts["system_prompt"])
    message = str(caught.value)
    assert message.startswith(f"the {too_long} is too long ({counts[too_long]} tokens): the prompt takes ")
    assert f"of which system_prompt {counts['system_prompt']}, question {counts['question']})" in message
    assert message.endswith(f"Shorten the {too_long}, or lower max_new_tokens")
    assert ask(small_model)[0].output_ids  # and the model still answers


class TokenizerSpy:
    """Counts the tokenizer's calls: a refusal by length must come before any of them."""

    def __init__(self, monkeypatch, tokenizer):
        self.calls = 0
        for name in ("tokenize_with_image_slots", "encode"):
            original = getattr(tokenizer, name)
            monkeypatch.setattr(tokenizer, name, self.counting(original))

    def counting(self, original):
        def call(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        return call


@pytest.mark.parametrize("where", ["question", "system_prompt", "prompt", "negative prompt"])
def test_a_huge_text_is_refused_by_its_length_before_it_is_tokenized(small_model, monkeypatch, where):
    huge = "x" * 8_000_000
    spy = TokenizerSpy(monkeypatch, small_model.tokenizer)
    context = small_model.config.llm.context_length
    limit = context * small_model.tokenizer.longest_piece
    with pytest.raises(InputError) as caught:
        if where == "question":
            ask(small_model, huge)
        elif where == "system_prompt":
            ask(small_model, system=huge)
        else:
            generate_codes(small_model, huge if where == "prompt" else APPLE,
                           **({"negative_prompt": huge} if where == "negative prompt" else {}))
    assert str(caught.value) == (
        f"the {where} is 8,000,000 characters long, more than the model's context of {context} tokens can hold "
        f"({limit:,} characters at most, {small_model.tokenizer.longest_piece} per token); shorten the {where}")
    assert spy.calls == 0


def test_the_character_bound_is_what_the_longest_token_allows(small_model, monkeypatch):
    tokenizer = small_model.tokenizer
    pieces = [tokenizer._sp.id_to_piece(i) for i in range(tokenizer._sp.get_piece_size())]
    assert tokenizer.longest_piece == max(len(p) for p in pieces + ["<im_start>", "<vi_start>"])
    at_limit = "<im_start>" * small_model.config.llm.context_length  # every token as long as a token gets
    spy = TokenizerSpy(monkeypatch, tokenizer)
    with pytest.raises(InputError, match="the question is too long"):  # tokenized, then refused by its count
        ask(small_model, at_limit)
    assert spy.calls > 0
