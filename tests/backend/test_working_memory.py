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

PROMPT = "a red apple on a table"
MiB = 2**20


class Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self.live:
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
