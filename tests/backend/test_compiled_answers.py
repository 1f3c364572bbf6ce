"""The compiled answer step (vilau_backend/decoding/text_step.py): the same answers as the eager loop,
compiled once per (rows, cache-length bucket), reused across tokens and runs.

Compiling costs time (tens of seconds for the golden model on two busy cores), so the module
compiles two sizes only: one answer (1 row) and one padded batch of two (2 rows).

Compiled and eager runs use different kernels (inductor fuses the attention's pointwise ops and
reductions; the static cache makes attention span the whole cache length, masked), so their
logits may differ in the last bits. Greedy answers must agree token for token up to the first step
whose two best tokens lie within their rounding bounds (conftest's first_unclear_steps); where a
run matches the original's recorded answer, that is asserted whole. A sampled token could flip
only if its uniform draw fell within that rounding of a boundary of the cumulative
distribution: about 1e-7 per step, and these runs are fixed.
"""

from __future__ import annotations

import pytest
import torch

from conftest import emulate_cuda, load_photo, recorded, first_unclear_steps
from vilau_backend.memory.placement import has_placement
from vilau_backend.decoding.compiled_steps import resolve_compile
from vilau_backend.decoding.prompts import understanding_prompt
from vilau_backend.decoding.answer_loop import generate_texts
from vilau_backend.tasks.image_splicing import prompt_embeddings
from vilau_backend.tasks.understand import GREEDY, TextSampling, describe_images

QUERY = "Describe the image."


@pytest.fixture(scope="module")
def compiled_once(golden_fp32):
    """The first compiled answer (it compiles the 1-row step), with what it reported."""
    from torch._dynamo.utils import counters

    counters.clear()
    notices = []
    [answer] = describe_images(golden_fp32, load_photo("chelsea"), QUERY, sampling=GREEDY, max_new_tokens=12,
                               compile=True, on_compile=lambda: notices.append("compiling"))
    return answer, notices, {k: dict(v) for k, v in counters.items()}


def test_first_compiled_answer_says_it_compiles_and_equals_the_original(compiled_once):
    answer, notices, _ = compiled_once
    expected = recorded("understanding_image_fp32")
    assert answer.output_ids == expected["output_ids"][1:]  # the original's ids start with a dummy BOS
    assert answer.text == expected["response"]
    assert notices == ["compiling"]


@pytest.mark.compiler_output
def test_first_compiled_answer_compiles_one_graph(compiled_once):
    _, _, counters = compiled_once
    # the whole decode step is one graph: no graph break inside it
    assert counters["stats"]["unique_graphs"] == 1, counters
    assert not counters.get("graph_break"), counters["graph_break"]


def test_later_tokens_and_runs_reuse_the_compiled_step(golden_fp32, compiled_once):
    """Another question (another prompt length in the same cache bucket), sampled with another seed
    and other settings: no recompilation, no notice, and the same tokens as the eager loop."""
    notices = []
    question = "What is in this picture? Answer briefly."
    sampling = TextSampling(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.1)
    options = dict(sampling=sampling, max_new_tokens=12, seed=5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        [compiled] = describe_images(golden_fp32, load_photo("coffee"), question, compile=True,
                                     on_compile=lambda: notices.append("compiling"), **options)
    [eager] = describe_images(golden_fp32, load_photo("coffee"), question, compile=False, **options)
    assert notices == []
    assert len(compiled.output_ids) == 12
    assert compiled.output_ids == eager.output_ids


def test_cancel_in_a_compiled_answer_leaves_the_next_answer_unchanged(golden_fp32, compiled_once):
    def stop(step, token, text):
        if step == 4:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        describe_images(golden_fp32, load_photo("chelsea"), QUERY, sampling=GREEDY, max_new_tokens=12,
                        compile=True, on_token=stop)
    [again] = describe_images(golden_fp32, load_photo("chelsea"), QUERY, sampling=GREEDY, max_new_tokens=12,
                              compile=True)
    assert again.output_ids == compiled_once[0].output_ids


def test_padded_batch_compiled_equals_eager(golden_fp32, compiled_once):
    """Two prompts of different lengths (left padding, masks and positions in the static cache):
    compiled greedy answers equal the eager ones up to the first decision not clear of rounding."""
    ids = [golden_fp32.tokenizer.tokenize_with_image_slots(understanding_prompt(q, 1))
           for q in (QUERY, "Is there a cat in this image? Say what colour it is.")]
    prompts = [prompt_embeddings(golden_fp32, i, golden_fp32.preprocess(load_photo(name)))
               for i, name in zip(ids, ("chelsea", "coffee"))]
    assert prompts[0].shape[0] != prompts[1].shape[0]
    eager = generate_texts(golden_fp32, prompts, max_new_tokens=10, compile=False)
    agree = first_unclear_steps(golden_fp32, prompts, eager)
    compiled = generate_texts(golden_fp32, prompts, max_new_tokens=10, compile=True)
    assert [c[:k] for c, k in zip(compiled, agree)] == [e[:k] for e, k in zip(eager, agree)], (compiled, eager, agree)
    assert [key.rows for key in golden_fp32.step_states] == [2]


def test_cpu_default_is_eager_and_keeps_no_state(golden_fp32):
    golden_fp32.release_step_states()
    describe_images(golden_fp32, load_photo("chelsea"), QUERY, sampling=GREEDY, max_new_tokens=2)
    assert golden_fp32.step_states == {}


def test_layers_placed_by_accelerate_run_eager(monkeypatch):
    """Streamed or split LLM layers move weights in Python hooks at every call: never compiled."""
    emulate_cuda(monkeypatch)
    assert resolve_compile(None, torch.device("cuda"), placed=False)
    assert not resolve_compile(None, torch.device("cpu"), placed=False)
    assert not resolve_compile(None, torch.device("cuda"), placed=True)
    assert not resolve_compile(True, torch.device("cuda"), placed=True)
    assert resolve_compile(True, torch.device("cpu"), placed=False)


def test_has_placement_sees_accelerate_hooks(golden_fp32):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    layer = golden_fp32.llm.model.layers[0]
    assert not has_placement(golden_fp32.llm)
    add_hook_to_module(layer, AlignDevicesHook(execution_device=torch.device("cpu")))
    try:
        assert has_placement(golden_fp32.llm)
    finally:
        remove_hook_from_module(layer)
    assert not has_placement(golden_fp32.llm)
