"""The compiled generation step (vilau_backend/decoding/position_step.py): same codes as the eager step,
compiled once per (rows, cache-length bucket), reused across positions and runs.

Compiling costs time (minutes for the golden checkpoint on two busy cores), so every test here
runs the golden fp32 model at batch 1 (2 rows) and reuses the one compiled step that the
module's first run builds.

Compiled and eager runs use different kernels (inductor fuses the pointwise ops and
reductions), so their logits differ in the last bits. Codes still agree wherever no decision
is a near-tie at that scale, which is what these runs are chosen and checked for (see
`decision_margins`): the assertions on equal codes rest on a measured margin, not on equal
bits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import reference
from vilau_backend.tasks.generate import ImageSampling, generate_codes, image_generators
from vilau_backend.decoding import compiled_steps
from vilau_backend.decoding.compiled_steps import needs_compiling, step_key
from vilau_backend.decoding.sampling import draw_uniforms

GREEDY = ImageSampling(top_k=1)
APPLE = "a red apple on a table"


@pytest.fixture(scope="module")
def compiled_once(golden_fp32):
    """The first compiled run of batch 1 (it compiles), with what it reported."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    notices = []
    codes = generate_codes(golden_fp32, APPLE, seed=3, compile=True, on_compile=lambda: notices.append("compiling"))
    return codes, notices, {k: dict(v) for k, v in counters.items()}


@pytest.mark.compiler_output
def test_first_compiled_run_says_it_compiles_and_compiles_one_graph(compiled_once):
    _, notices, counters = compiled_once
    assert notices == ["compiling"]
    # one frame (the whole step) compiled into one graph: no graph break inside the step
    assert counters["stats"]["unique_graphs"] == 1, counters
    assert not counters.get("graph_break"), counters["graph_break"]


@pytest.mark.compiler_output
def test_later_positions_and_runs_reuse_the_compiled_step(golden_fp32, compiled_once):
    """No recompilation across positions (the first run has already gone through all of them)
    nor across runs of the same batch size: another prompt length in the same cache bucket,
    another seed, guidance scale and sampling settings."""
    from torch._dynamo.utils import counters

    notices = []
    sampling = ImageSampling(cfg=5.5, temperature=0.7, top_k=40, top_p=0.8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate_codes(golden_fp32, APPLE + ", on a wooden table, in the evening", seed=9, sampling=sampling,
                       compile=True, on_compile=lambda: notices.append("compiling"))
        generate_codes(golden_fp32, APPLE, sampling=GREEDY, compile=True)
    assert notices == []
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_sampled_codes_equal_eager_codes_with_the_same_seed(golden_fp32, compiled_once):
    compiled, _, _ = compiled_once
    eager = generate_codes(golden_fp32, APPLE, seed=3, compile=False)
    differ = (compiled != eager).sum().item()
    assert differ == 0, f"{differ} of {eager.numel()} codes differ between the compiled and the eager step"


def test_compiled_greedy_codes_equal_the_original_in_fp32(golden_fp32, compiled_once):
    """The original's fp32 run made two images; image 0 alone is the same image (batch independence)."""
    ref = reference("imagegen_cfg3_fp32_codes.safetensors")
    with torch._dynamo.config.patch(error_on_recompile=True):
        codes = generate_codes(golden_fp32, APPLE, num_images=1, sampling=GREEDY, compile=True).cpu()
    expected = ref["codes"][:1].reshape(1, 16, 16, 4)  # the first conditional row
    mismatches = (codes != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {codes.numel()} codes differ from the original's"


def test_cancel_in_a_compiled_run_leaves_the_next_run_unchanged(golden_fp32, compiled_once):
    compiled, _, _ = compiled_once

    def stop(done, total, codes):
        if done == 7:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        generate_codes(golden_fp32, APPLE, seed=3, compile=True, on_position=stop)
    assert torch.equal(generate_codes(golden_fp32, APPLE, seed=3, compile=True), compiled)


def test_a_run_after_a_cancelled_first_compiled_run_only_replays_and_says_so(golden_fp32, compiled_once):
    """The first compiled run of a size is cancelled after its first position: the step is traced by
    then, so the next run of that size neither compiles nor says "compiling…"."""
    key = step_key(golden_fp32, 2, 512)
    # as for a model that has not run this size yet (dynamo still holds the graph, so nothing recompiles)
    compiled_steps._traced.discard((id(golden_fp32), key))
    notices = []

    def stop(done, total, codes):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        generate_codes(golden_fp32, APPLE, seed=3, compile=True, on_position=stop,
                       on_compile=lambda: notices.append("compiling"))
    assert notices == ["compiling"]
    assert not needs_compiling(golden_fp32, key)
    with torch._dynamo.config.patch(error_on_recompile=True):
        codes = generate_codes(golden_fp32, APPLE, seed=3, compile=True, on_compile=lambda: notices.append("again"))
    assert notices == ["compiling"]
    assert torch.equal(codes, compiled_once[0])


def test_compiled_step_is_kept_per_size_on_the_model(golden_fp32, compiled_once):
    key = step_key(golden_fp32, 2, 512)
    assert not needs_compiling(golden_fp32, key)
    assert list(golden_fp32.step_states) == [key]  # one state at a time
    golden_fp32.release_step_states()
    assert golden_fp32.step_states == {}
    # freed buffers are allocated again, the compiled graph is reused
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(generate_codes(golden_fp32, APPLE, seed=3, compile=True), compiled_once[0])


def test_uniforms_of_image_i_do_not_depend_on_the_batch():
    """Batch independence of the pre-drawn randomness: image i's (P, D) uniforms come from its own generator."""
    three = draw_uniforms(image_generators(4, 3), 256, 4)
    one = draw_uniforms(image_generators(4, 1), 256, 4)
    assert three.shape == (3, 256, 4) and torch.equal(three[0], one[0])
    assert not torch.equal(three[0], three[1])
    # the numbers one draw per depth step gave before they were drawn up front
    g = image_generators(4, 1)[0]
    stepwise = torch.cat([torch.rand(1, generator=g) for _ in range(8)])
    assert torch.equal(one[0].flatten()[:8], stepwise)


class CancelPressed(Exception):
    pass


def cancel() -> None:
    raise CancelPressed


@pytest.mark.parametrize("kind", ["image", "text"])
def test_a_cancel_read_before_compiling_stops_the_run_before_anything_compiles(golden_fp32, kind):
    """ComfyUI's on_compile reads Cancel first (nodes/progress.py): raising there must stop the run
    before torch.compile starts, which can't be interrupted once it runs."""
    from torch._dynamo.utils import counters

    from vilau_backend.tasks.understand import GREEDY as GREEDY_TEXT
    from vilau_backend.tasks.understand import describe_images

    before = counters["stats"]["unique_graphs"]
    with pytest.raises(CancelPressed):
        if kind == "image":
            generate_codes(golden_fp32, APPLE, num_images=3, compile=True, on_compile=cancel)
        else:
            describe_images(golden_fp32, torch.rand(3, 16, 16, 3), "Describe the image.", batch=True,
                            sampling=GREEDY_TEXT, max_new_tokens=4, compile=True, on_compile=cancel)
    assert counters["stats"]["unique_graphs"] == before  # nothing was traced or compiled


def test_cpu_steps_compile_scalar_code_where_inductor_has_no_vector_isa(monkeypatch):
    """With no vector ISA (a CPU without AVX2, or ATEN_CPU_CAPABILITY=default), or one capped below the
    CPU's own, inductor is asked for scalar code; with the CPU's own ISA, inductor keeps its choice."""
    import torch._inductor.cpu_vec_isa as vec_isa

    from vilau_backend.decoding.compiled_steps import cpu_inductor_options

    monkeypatch.setattr(vec_isa, "valid_vec_isa_list", lambda: [vec_isa.VecAVX512(), vec_isa.VecAVX2()])
    monkeypatch.setattr(vec_isa, "pick_vec_isa", lambda: vec_isa.invalid_vec_isa)
    assert cpu_inductor_options() == {"cpp.vec_isa_ok": False}
    monkeypatch.setattr(vec_isa, "pick_vec_isa", lambda: vec_isa.VecAVX2())
    assert cpu_inductor_options() == {"cpp.vec_isa_ok": False}
    monkeypatch.setattr(vec_isa, "pick_vec_isa", lambda: vec_isa.VecAVX512())
    assert cpu_inductor_options() == {}
