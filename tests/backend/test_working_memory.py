"""Working memory a run asks for before it allocates (memory/working_memory.py), checked against the
allocations the run really makes on the CPU, and refusal before allocating when it cannot fit.

`Allocations` follows every tensor storage the run's operators create, by their lifetime (storages
keep their Python object, so a finalizer sees the moment torch frees one): `peak` is the most that
was alive at once, beyond what existed before (the weights)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import GOLDEN_CHECKPOINT, load_photo
from vilau_backend.decoding.answer_loop import generate_texts
from vilau_backend.decoding.compiled_steps import cache_length
from vilau_backend.decoding.prompts import cfg_batch, understanding_prompt
from vilau_backend.errors import InputError
from vilau_backend.memory import working_memory
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.tasks.generate import generate_codes, generate_images
from vilau_backend.tasks.image_splicing import prompt_embeddings
from vilau_backend.tasks.understand import _answer_about, answer_each_image, answer_request, describe_images, describe_video

PROMPT = "a red apple on a table"
MiB = 2**20


class Allocations(TorchDispatchMode):
    def __init__(self, existing=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        # storages that existed before (weights, inputs): an operator that returns them, or a view of them
        # (a slice of the pixels, a codebook without its padding row), allocates nothing
        self.existing = {tensor.untyped_storage().data_ptr() for tensor in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self.live and storage.data_ptr() not in self.existing:
                    self.live[storage._cdata] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, storage._cdata)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


@pytest.fixture
def model():
    """A model of its own: the tests give it a make_room of their own."""
    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu")


def budget(model, free: int) -> list[int]:
    """The host frees what it can and `free` bytes are free; what was asked for is recorded."""
    asked = []
    model.make_room = lambda need: asked.append(need) or free
    return asked


def generation_estimate(model, images: int) -> working_memory.WorkingMemory:
    prompt_len = cfg_batch(model.tokenizer, PROMPT, n=images)[0].shape[1]
    length = cache_length(prompt_len, model.config.grid[0] * model.config.grid[1])
    return working_memory.generation_memory(model, images, prompt_len, length, kept=False)


def within(measured: int, estimate: int, tolerance: float = 0.10) -> bool:
    return abs(estimate - measured) <= tolerance * measured


@pytest.mark.parametrize("images", [1, 4])
def test_a_run_asks_for_its_estimate_which_is_what_it_allocates(model, images):
    asked = budget(model, free=2**40)
    with Allocations() as codes_run:
        codes = generate_codes(model, PROMPT, num_images=images, compile=False)
    with Allocations() as decoding:
        model.decode_codes(codes)
    estimate = generation_estimate(model, images)
    assert asked == [estimate.peak]
    measured = max(codes_run.peak, decoding.peak)
    assert within(measured, estimate.peak), (measured / MiB, estimate.peak / MiB)
    # the code loop alone: the KV cache and step buffers with one layer's prefill
    prompt_len = cfg_batch(model.tokenizer, PROMPT, n=images)[0].shape[1]
    length = cache_length(prompt_len, 256)
    loop = working_memory.image_state_bytes(model, 2 * images, length) + working_memory.prefill_bytes(
        model, 2 * images, prompt_len, length)
    assert within(codes_run.peak, loop), (codes_run.peak / MiB, loop / MiB)


def test_a_run_that_does_not_fit_is_refused_before_it_allocates(model):
    estimate = generation_estimate(model, 4)
    asked = budget(model, free=estimate.peak // 2)
    with Allocations() as refused, pytest.raises(InputError) as error:
        generate_images(model, PROMPT, num_images=4, compile=False)
    assert asked == [estimate.peak]
    assert refused.peak < estimate.peak / 20, refused.peak  # the prompt's ids and the uniforms, nothing large
    message = str(error.value)
    need, free = f"{estimate.peak / 2**30:.1f} GiB", f"{estimate.peak // 2 / 2**30:.1f} GiB"
    assert "4 image(s) at 256 px" in message and need in message and free in message, message
    assert "lower batch_size (--num on the command line)" in message and "quantize int8" in message, message
    assert "--quantize on the command line" in message, message


@pytest.mark.parametrize("questions", [["Describe the image."] * 3, ["Describe the image.", "What is it?"]])
def test_an_answer_asks_for_its_estimate_which_is_what_it_allocates(model, questions):
    """Equal prompts and unequal ones, which are left-padded."""
    prompts = [prompt_embeddings(model, model.tokenizer.tokenize_with_image_slots(understanding_prompt(q, 1)),
                                 model.preprocess(load_photo("chelsea"))) for q in questions]
    asked = budget(model, free=2**40)
    with Allocations() as run:
        generate_texts(model, prompts, max_new_tokens=16, compile=False)
    T = max(p.shape[0] for p in prompts)
    estimate = working_memory.answer_memory(model, len(prompts), T, cache_length(T, 16), kept=False)
    assert asked == [estimate.peak]
    assert within(run.peak, estimate.peak), (run.peak / MiB, estimate.peak / MiB)


def test_a_compiled_run_of_the_held_size_asks_only_for_what_it_adds(model):
    from vilau_backend.decoding.compiled_steps import step_key

    key = step_key(model, 2, 512)
    held = working_memory.WorkingMemory(peak=300, held=200)
    model.step_states[key] = object()
    asked = budget(model, free=2**40)
    working_memory.reserve_for_run(model, key, held, "a run", "lower batch_size")
    working_memory.reserve_for_run(model, step_key(model, 4, 512), held, "a run", "lower batch_size")
    assert asked == [100, 300]
    assert model.step_states == {}  # another size: the held state was freed before asking


def understanding_estimate(model, images_per_prompt: int, prompts: int, max_new_tokens: int) -> working_memory.WorkingMemory:
    """An eager answer run of `prompts` prompts with `images_per_prompt` images each, encoded together."""
    ids = model.tokenizer.tokenize_with_image_slots(understanding_prompt("Describe the image.", images_per_prompt))
    T = len(ids) + images_per_prompt * (model.config.tokens_per_image - 1)
    answer = working_memory.answer_memory(model, prompts, T, cache_length(T, max_new_tokens), kept=False)
    return working_memory.understanding_memory(model, answer, prompts, T, images_per_prompt)


@pytest.mark.parametrize("prompts, images_per_prompt", [(1, 1), (3, 1), (1, 4)])
def test_an_answer_asks_before_encoding_for_its_estimate_which_is_what_it_allocates(model, prompts, images_per_prompt):
    """The images' encoding (SigLIP's attention, the quantizer's nearest-code search) and the answer loop
    after it, asked for together before the first image is encoded."""
    pixels = model.preprocess(load_photo("chelsea").expand(prompts * images_per_prompt, -1, -1, -1))
    request = answer_request("Describe the image.", dict(max_new_tokens=16, compile=False))
    asked = budget(model, free=2**40)
    with Allocations(existing=[pixels, *model.networks.parameters(), *model.networks.buffers()]) as run:
        if images_per_prompt == 1:
            answer_each_image(model, pixels, request)
        else:  # what describe_video runs after preprocessing the frames (on the CPU, before the run)
            _answer_about(model, pixels, request, None, None)
    estimate = understanding_estimate(model, images_per_prompt, prompts, 16)
    assert asked[0] == estimate.peak  # (the answer loop asks again for its own part: asked[1])
    assert within(run.peak, estimate.peak), (run.peak / MiB, estimate.peak / MiB)


@pytest.mark.parametrize("case", ["answers together", "video"])
def test_an_answer_that_does_not_fit_is_refused_before_any_image_is_encoded(model, monkeypatch, case):
    encoded = []
    monkeypatch.setattr(model, "encode_pixels", lambda pixels: encoded.append(pixels.shape[0]))
    monkeypatch.setattr(model, "encode_images", lambda images: encoded.append(images.shape[0]))
    images = load_photo("chelsea").expand(4, -1, -1, -1)
    estimate = understanding_estimate(model, *((1, 4) if case == "answers together" else (4, 1)), max_new_tokens=64)
    asked = budget(model, free=estimate.peak // 2)
    with pytest.raises(InputError) as error:
        if case == "answers together":
            describe_images(model, images, "Describe the image.", batch=True, batch_size=4, max_new_tokens=64,
                            compile=False)
        else:
            describe_video(model, images, "Describe the image.", choice=None, max_new_tokens=64, compile=False)
    assert encoded == [], "an image was encoded before the run was refused"
    assert asked == [estimate.peak]
    message = str(error.value)
    need, free = f"{estimate.peak / 2**30:.1f} GiB", f"{estimate.peak // 2 / 2**30:.1f} GiB"
    assert need in message and free in message and "lower batch_size or max_new_tokens" in message, message
