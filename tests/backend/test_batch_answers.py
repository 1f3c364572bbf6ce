"""Answers generated together in one padded pass equal answers generated one at a time.

A pass over B prompts multiplies (B*T, H) matrices where a single answer multiplies (T, H):
other GEMM blockings, so fp32 logits may differ in the last bits (on this CPU they are
identical; `test_batched_logits_match_single_logits` bounds the gap by the arithmetic,
tests/conftest.py). Greedy answers are therefore compared token by token, and a difference is
accepted only where the single run's two best candidates were tied within their rounding
bounds (a near-tie any rounding may flip); everything
after such a flip legitimately differs. Every other difference fails the test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFERENCE, logit_bounds, on_device, reference, with_eos
from vilau_backend.errors import InputError
from vilau_backend.checkpoint.tokenizer import IMAGE_TOKEN_INDEX
from vilau_backend.decoding.answer_loop import AnswerSteps, generate_text, generate_texts, streamed_text
from vilau_backend.tasks.image_splicing import prompt_embeddings
from vilau_backend.tasks.understand import answer_each_image, GREEDY, TextSampling, describe_images

QUERY = "Describe the image."
# the cache the prompts (352 positions) and 16 answer tokens attend over, for the rounding bound
CACHE_LENGTH = 512


def photos() -> torch.Tensor:
    """Four distinct images as ComfyUI IMAGE (4, 256, 256, 3): the two golden photos and their mirrors."""
    batch = []
    for name in ("chelsea", "coffee"):
        image = Image.open(REFERENCE / "inputs" / f"{name}.png").convert("RGB").resize((256, 256))
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    return torch.stack(batch + [image.flip(1) for image in batch])


def single_run_logits(model, embeds: torch.Tensor, prefix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (V,) a single run sees after generating `prefix` (teacher-forced), and their fp32
    rounding bound (V,) (tests/conftest.py: logit_bounds)."""
    with torch.inference_mode(), logit_bounds(model, CACHE_LENGTH) as bounds:
        run = AnswerSteps(model, [embeds], max(len(prefix), 1))  # eager
        logits = run.prefill()
        for step, token in enumerate(prefix):
            logits = run.step(torch.tensor([token]), step)
    return logits[0], bounds.logits[-1][0]


def assert_same_tokens_but_near_ties(model, embeds: torch.Tensor, got: list[int], expected: list[int]) -> None:
    if got == expected:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert k < min(len(got), len(expected)), f"one answer stops early without a different token: {got} vs {expected}"
    logits, bound = single_run_logits(model, embeds, expected[:k])
    best = logits.topk(2)
    margin = float(best.values[0] - best.values[1])
    tie = float(bound[best.indices].sum())  # two orders of summation may move each logit by its bound
    assert {got[k], expected[k]} == set(best.indices.tolist()) and margin <= tie, (
        f"token {k} differs ({got[k]} batched, {expected[k]} alone) without a near-tie: the two best "
        f"candidates alone were {best.indices.tolist()} with a margin of {margin:.3g}\n"
        f"batched {got}\nalone   {expected}"
    )


def test_batch_answers_equal_single_answers(golden_fp32):
    images = photos()
    batch = describe_images(golden_fp32, images, QUERY, batch=True, sampling=GREEDY, max_new_tokens=16)
    assert len(batch) == 4
    for i, answer in enumerate(batch):
        [alone] = describe_images(golden_fp32, images[i : i + 1], QUERY, sampling=GREEDY, max_new_tokens=16)
        embeds = prompt_embeddings(golden_fp32, alone.input_ids, golden_fp32.preprocess(images[i : i + 1]))
        assert answer.input_ids == alone.input_ids
        assert_same_tokens_but_near_ties(golden_fp32, embeds, answer.output_ids, alone.output_ids)
        if answer.output_ids == alone.output_ids:
            assert answer.text == alone.text
    assert len({tuple(a.output_ids) for a in batch}) > 1, "four different images gave the same answer"


def test_batched_logits_match_single_logits(golden_fp32):
    images = golden_fp32.preprocess(photos())
    ids = golden_fp32.tokenizer.tokenize_with_image_slots(f"USER: <image>\n{QUERY} ASSISTANT:")
    prompts = [prompt_embeddings(golden_fp32, ids, images[i : i + 1]) for i in range(4)]
    with torch.inference_mode():
        together = AnswerSteps(golden_fp32, prompts, 1).prefill()  # (4, V)
    alone, bound = map(torch.stack, zip(*[single_run_logits(golden_fp32, p, []) for p in prompts]))  # (4, V) each
    gap = (together - alone).abs()
    print(f"batched vs single logits: max |diff| {gap.max().item():.1e}, bound {bound.min().item():.1e}..{bound.max().item():.1e}")
    assert (gap <= bound).all(), f"batched logits exceed the rounding bound by {(gap - bound).max().item():.2e}"


def test_padded_prompts_of_different_lengths_equal_single_runs(golden_fp32):
    images = golden_fp32.preprocess(photos())
    tokenizer = golden_fp32.tokenizer
    questions = ["<image>\nDescribe the image.", "<image>\nWhat is in it? Answer in one long sentence, please.",
                 "<image>\n<image>\nCompare."]
    prompts = []
    for i, question in enumerate(questions):
        ids = tokenizer.tokenize_with_image_slots(f"USER: {question} ASSISTANT:")
        prompts.append(prompt_embeddings(golden_fp32, ids, images[i : i + ids.count(IMAGE_TOKEN_INDEX)]))
    assert len({p.shape[0] for p in prompts}) == 3  # three lengths: the batch is left-padded
    together = generate_texts(golden_fp32, prompts, sampling=GREEDY, max_new_tokens=12)
    for embeds, got in zip(prompts, together):
        expected = generate_text(golden_fp32, embeds, sampling=GREEDY, max_new_tokens=12)
        assert_same_tokens_but_near_ties(golden_fp32, embeds, got, expected)


def test_a_row_that_reaches_eos_stops_while_the_others_go_on(golden_fp32):
    # pretend the third greedy token of the recorded answer is EOS
    recorded_ids = reference("understanding_image_fp32.safetensors")
    embeds = on_device(golden_fp32, recorded_ids["inputs_embeds"])
    first = generate_text(golden_fp32, embeds, sampling=GREEDY, max_new_tokens=12)
    eos = first[2]
    model = with_eos(golden_fp32, eos)
    other = prompt_embeddings(golden_fp32, golden_fp32.tokenizer.tokenize_with_image_slots("USER: <image>\nHi"),
                               golden_fp32.preprocess(photos()[1:2]))
    other_alone = generate_text(model, other, sampling=GREEDY, max_new_tokens=12)
    assert eos not in other_alone[:11], "pick another prompt: this one meets the pretend EOS early too"
    events = []
    together = generate_texts(model, [embeds, other], sampling=GREEDY, max_new_tokens=12,
                              on_step=lambda step, tokens, texts: events.append(tokens))
    assert together[0] == first[:3]
    assert_same_tokens_but_near_ties(golden_fp32, other, together[1], other_alone)
    assert [tokens[0] for tokens in events] == first[:3] + [None] * (len(events) - 3)
    assert len(events) == len(together[1])


def test_sampled_batch_answers_equal_single_answers_with_the_same_seed(golden_fp32):
    # each answer draws from its own generator seeded with `seed`; with equal logits (this CPU)
    # the draws are the same as alone; elsewhere a flip needs a uniform within 1e-7 of a boundary
    images = photos()[:3]
    options = dict(sampling=TextSampling(), max_new_tokens=10, seed=11)
    together = describe_images(golden_fp32, images, QUERY, batch=True, **options)
    alone = [describe_images(golden_fp32, images[i : i + 1], QUERY, **options)[0] for i in range(3)]
    assert [a.output_ids for a in together] == [a.output_ids for a in alone]


def test_batch_size_splits_passes_and_streams_all_answers(golden_fp32):
    images = photos()[:3]
    seen = []
    answers = describe_images(
        golden_fp32, images, QUERY, batch=True, batch_size=2, sampling=GREEDY, max_new_tokens=6,
        on_answers=lambda step, texts: seen.append((step, list(texts))),
    )
    one_pass = describe_images(golden_fp32, images, QUERY, batch=True, batch_size=8, sampling=GREEDY, max_new_tokens=6)
    assert [a.output_ids for a in answers] == [a.output_ids for a in one_pass]
    # two passes: answers 1-2 stream, then answer 3 streams after their final texts
    assert [len(texts) for _, texts in seen] == [2] * 6 + [3] * 6
    assert [step for step, _ in seen] == list(range(6)) * 2
    assert seen[-1][1] == [a.text for a in answers]
    assert seen[6][1][:2] == [a.text for a in answers[:2]]


def test_answer_each_image_uses_the_system_prompt(golden_fp32):
    pixels = golden_fp32.preprocess(photos()[:1])
    [plain] = answer_each_image(golden_fp32, pixels, QUERY, sampling=GREEDY, max_new_tokens=2)
    [custom] = answer_each_image(golden_fp32, pixels, QUERY, system="You caption images.", sampling=GREEDY,
                                 max_new_tokens=2)
    tokenizer = golden_fp32.tokenizer
    slot = custom.input_ids.index(IMAGE_TOKEN_INDEX)
    assert tokenizer.decode(custom.input_ids[:slot], skip_special_tokens=True) == "You caption images. USER: "
    assert tokenizer.decode(plain.input_ids[:4], skip_special_tokens=True).startswith("A chat")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_is_an_input_error(golden_fp32, batch_size):
    with pytest.raises(InputError, match="batch_size"):
        describe_images(golden_fp32, photos()[:1], QUERY, batch=True, batch_size=batch_size)


def test_streamed_text_shows_only_complete_characters(golden_fp32):
    tokenizer = golden_fp32.tokenizer
    final = "a café 日本"
    ids = tokenizer.encode(final, add_bos=False)
    model = SimpleNamespace(tokenizer=tokenizer)
    shown = [streamed_text(model, ids[:n]) for n in range(1, len(ids) + 1)]
    # the golden checkpoint's small vocabulary spells é and the CJK characters in byte-fallback tokens: some
    # prefixes end inside a character, and decoding them whole would show U+FFFD
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    assert all("\ufffd" not in text for text in shown), shown
    assert all(final.startswith(text) for text in shown), shown
    assert shown[-1] == final
