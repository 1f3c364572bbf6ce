"""Prompts and token ids: the golden fixture recorded them from the original VILA-U."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from conftest import FIXTURE, GOLDEN_CHECKPOINT, REFERENCE, recorded
from vilau_backend.errors import CheckpointError, InputError
from vilau_backend.decoding.prompts import cfg_batch, conversation_prompt, generation_prompt, understanding_prompt
from vilau_backend.checkpoint.tokenizer import (
    IM_END,
    IM_PATCH,
    IM_START,
    IMAGE_TOKEN_INDEX,
    VI_END,
    VI_START,
    MissingVilaTokensError,
    VilaTokenizer,
)

LLM_DIR = GOLDEN_CHECKPOINT / "llm"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


PROBES = _read_json(REFERENCE / "tokenizer_probes.json")
PROBE_IDS = [repr(probe["text"]) for probe in PROBES]


@pytest.fixture(scope="module")
def tokenizer() -> VilaTokenizer:
    return VilaTokenizer(LLM_DIR)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return _read_json(FIXTURE / "manifest.json")


def _recorded_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(REFERENCE / name), framework="pt") as f:
        return f.get_tensor("input_ids"), f.get_tensor("attention_mask")


def _copy_tokenizer(tmp_path: Path) -> Path:
    folder = tmp_path / "llm"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(LLM_DIR / name, folder / name)
    return folder


# tokenizer: every probe the fixture recorded


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_encode_gives_the_original_ids(tokenizer, probe):
    assert tokenizer.encode(probe["text"]) == probe["tokenizer(text).input_ids"]


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_tokenize_gives_the_original_tokens(tokenizer, probe):
    assert ["<s>", *tokenizer.tokenize(probe["text"])] == probe["tokens"]


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_tokenize_with_image_slots_gives_the_original_ids(tokenizer, probe):
    assert tokenizer.tokenize_with_image_slots(probe["text"]) == probe["tokenizer_image_token"]


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_decode_skipping_special_tokens_gives_the_original_text(tokenizer, probe):
    ids = probe["tokenizer(text).input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == probe["decode_skip_special"]


def test_decode_keeps_special_tokens_spaced_like_the_original(tokenizer):
    # recorded with the original (transformers 4.36 + VILA's tokenization_llama.py)
    assert tokenizer.decode([1, 341, 1000, 905, 1001, 2]) == "<s> A <im_start> <im_end> </s>"


@pytest.mark.parametrize("kind", ["image", "video"])
def test_decode_of_generated_ids_gives_the_recorded_response(tokenizer, kind):
    run = recorded(f"understanding_{kind}_fp32")
    # as generate_content: decode(skip_special_tokens=True).strip()
    assert tokenizer.decode(run["output_ids"], skip_special_tokens=True).strip() == run["response"]


def test_special_token_ids_are_those_of_the_checkpoint(tokenizer, manifest):
    expected = manifest["checkpoint"]["config_summary"]["tokenizer"]
    vocab_size = _read_json(LLM_DIR / "config.json")["vocab_size"]
    assert len(tokenizer) == expected["len"] == vocab_size
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == ("<s>", "</s>", "<unk>", "<unk>")
    named = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token)
    assert [tokenizer.token_id(token) for token in named] == [1, 2, 0, 0]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    # the LLM recognises the start tokens as vocab-4 and vocab-2
    assert tokenizer.token_id(IM_START) == expected["im_start"] == vocab_size - 4
    assert tokenizer.token_id(VI_START) == expected["vi_start"] == vocab_size - 2
    assert (tokenizer.token_id(IM_END), tokenizer.token_id(VI_END)) == (vocab_size - 3, vocab_size - 1)
    assert tokenizer.token_id(IM_PATCH) is None


def test_ids_ignore_the_models_dummy_prefix_setting(tmp_path):
    # LLaMA-2's tokenizer.model has add_dummy_prefix on (the golden checkpoint's has it
    # off); the original switched it off, so the ids must not change.
    folder = _copy_tokenizer(tmp_path)
    model = folder / "tokenizer.model"
    model.write_bytes(model.read_bytes() + b"\x1a\x02\x18\x01")  # merge normalizer_spec {add_dummy_prefix: true}
    assert spm.SentencePieceProcessor(model_file=str(model)).encode("red", out_type=str)[0].startswith("\u2581")
    tokenizer = VilaTokenizer(folder)
    for probe in PROBES:
        assert tokenizer.encode(probe["text"]) == probe["tokenizer(text).input_ids"], probe["text"]
        assert tokenizer.decode(probe["tokenizer(text).input_ids"], skip_special_tokens=True) == probe["decode_skip_special"]


def test_im_patch_token_takes_the_next_id_when_the_config_asks_for_it():
    tokenizer = VilaTokenizer(LLM_DIR, add_im_patch_token=True)
    # recorded with the original after tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    assert (tokenizer.token_id(IM_PATCH), len(tokenizer)) == (1004, 1005)
    assert tokenizer.encode("<im_patch>") == [1, 1004]
    assert tokenizer.encode("a<im_patch> b") == [1, 260, 1004, 279]
    assert tokenizer.decode([1, 260, 1004, 279], skip_special_tokens=True) == "a b"


@pytest.mark.parametrize(
    "removed",
    [("<im_start>", "<im_end>", "<vi_start>", "<vi_end>"), ("<vi_start>", "<vi_end>")],
    ids=["all", "video"],
)
def test_missing_vila_u_tokens_raise_an_error_naming_folder_and_tokens(tmp_path, removed):
    folder = _copy_tokenizer(tmp_path)
    added = {t: i for t, i in _read_json(folder / "added_tokens.json").items() if t not in removed}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    config = _read_json(folder / "tokenizer_config.json")
    config["added_tokens_decoder"] = {
        i: t for i, t in config["added_tokens_decoder"].items() if t["content"] not in removed
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    with pytest.raises(MissingVilaTokensError) as caught:
        VilaTokenizer(folder)
    message = str(caught.value)
    assert f"llm/ tokenizer in '{folder}' lacks the VILA-U tokens {', '.join(removed)}" in message
    assert "not a VILA-U checkpoint or its llm/added_tokens.json is missing" in message
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, ValueError)


def test_missing_tokenizer_model_raises_an_error_naming_the_folder(tmp_path):
    folder = _copy_tokenizer(tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.model"):
        VilaTokenizer(folder)


# prompts


def test_empty_user_turn_renders_without_a_space():
    # as the original: " ".strip() is empty and takes the 'USER:' branch of the template
    assert conversation_prompt(" ").endswith("questions. USER:ASSISTANT:")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_understanding_prompt_and_ids_equal_the_recorded_ones(tokenizer, kind):
    run = recorded(f"understanding_{kind}_fp32")
    # a video brings one <image> slot per frame used
    prompt = understanding_prompt(run["query"], n_images=run["num_frames_used"])
    assert prompt == run["prompt_string"]
    ids = tokenizer.tokenize_with_image_slots(prompt)
    assert ids == run["input_ids"]
    assert ids.count(IMAGE_TOKEN_INDEX) == run["num_frames_used"]


def test_understanding_prompt_puts_one_slot_per_image_before_the_query():
    assert understanding_prompt("  What differs? ", n_images=2).endswith(
        "USER: <image>\n<image>\n  What differs? ASSISTANT:"
    )


@pytest.mark.parametrize(
    ("kind", "text", "video"),
    [("imagegen", "a red apple on a table", False), ("videogen", "fireworks in the air", True)],
)
def test_generation_prompts_equal_the_recorded_ones(manifest, kind, text, video):
    conditional, unconditional = manifest["run_summary"][f"{kind}_prompts"]
    assert generation_prompt(text, video=video) == conditional
    assert generation_prompt(" ", video=video) == unconditional


@pytest.mark.parametrize("name", ["imagegen_cfg1_bf16", "imagegen_cfg3_bf16", "imagegen_cfg5_bf16"])
def test_image_cfg_batch_equals_the_recorded_one(tokenizer, name):
    expected_ids, expected_mask = _recorded_batch(f"{name}.safetensors")
    input_ids, attention_mask = cfg_batch(tokenizer, "a red apple on a table", n=2)
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.bool
    assert torch.equal(input_ids, expected_ids), f"expected\n{expected_ids}\ngot\n{input_ids}"
    assert torch.equal(attention_mask, expected_mask), f"expected\n{expected_mask}\ngot\n{attention_mask}"


def test_video_cfg_batch_equals_the_recorded_one(tokenizer):
    expected_ids, expected_mask = _recorded_batch("videogen_cfg3_bf16.safetensors")
    input_ids, attention_mask = cfg_batch(tokenizer, "fireworks in the air", n=1, video=True)
    assert torch.equal(input_ids, expected_ids), f"expected\n{expected_ids}\ngot\n{input_ids}"
    assert torch.equal(attention_mask, expected_mask), f"expected\n{expected_mask}\ngot\n{attention_mask}"


def test_cfg_batch_left_pads_the_shorter_conditional_rows_with_zero(tokenizer):
    negative = "blurry, low quality, watermark"
    input_ids, attention_mask = cfg_batch(tokenizer, "cat", negative_prompt=negative, n=2)
    conditional = tokenizer.tokenize_with_image_slots(generation_prompt("cat"))
    unconditional = tokenizer.tokenize_with_image_slots(generation_prompt(negative))
    pad = len(unconditional) - len(conditional)
    assert pad > 0 and input_ids.shape == attention_mask.shape == (4, len(unconditional))
    for row in (0, 1):
        assert input_ids[row].tolist() == [0] * pad + conditional
        assert attention_mask[row].tolist() == [False] * pad + [True] * len(conditional)
    for row in (2, 3):
        assert input_ids[row].tolist() == unconditional
        assert bool(attention_mask[row].all())


def test_cfg_batch_rejects_image_placeholder_in_the_prompt(tokenizer):
    with pytest.raises(InputError, match="<image>"):
        cfg_batch(tokenizer, "a <image> of a cat")


def test_custom_preset_asks_the_question_as_typed():
    from vilau_backend.decoding.prompts import preset_question

    assert preset_question("custom", "What color is the car?", "image") == "What color is the car?"


def test_presets_ask_their_own_question_about_the_right_media():
    from vilau_backend.decoding.prompts import preset_question

    assert preset_question("short caption", "ignored", "image") == "Describe the image in one short sentence."
    assert preset_question("detailed caption", "", "video") == "Describe the video in detail."
    assert preset_question("detailed caption", "", "image") == "Describe the image in detail."  # today's default


def test_preset_choices_fit_the_media():
    from vilau_backend.decoding.prompts import question_presets

    image, video = question_presets("image"), question_presets("video")
    assert image[0] == video[0] == "custom"
    assert {"short caption", "detailed caption", "Stable Diffusion prompt", "comma-separated tags"} <= set(image)
    assert "Stable Diffusion prompt" not in video and "visible text (OCR)" not in video
    assert "what happens" in video and "what happens" not in image


def test_unknown_preset_lists_the_choices():
    from vilau_backend.errors import InputError
    from vilau_backend.decoding.prompts import preset_question

    with pytest.raises(InputError, match=r"unknown question preset 'what happens' for questions about images; choose one of: custom"):
        preset_question("what happens", "", "image")

