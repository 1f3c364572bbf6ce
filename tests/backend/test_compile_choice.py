"""How the steps are compiled in the process a ComfyUI user has (decoding/compile_choice.py), emulated on
the CPU by patching what torch reports: ComfyUI's default cudaMallocAsync allocator (no CUDA graphs),
no Triton or a pre-Volta GPU (eager), and a compile that fails (the run finishes eager, same result)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import GOLDEN_CHECKPOINT, emulate_cuda, load_photo
from vilau_backend.decoding import compile_choice, compiled_steps
from vilau_backend.decoding.compile_choice import CUDA_GRAPHS, compile_mode, device_notice
from vilau_backend.decoding.compiled_steps import compiled_step, resolve_compile
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.tasks.generate import generate_codes
from vilau_backend.tasks.understand import GREEDY, describe_images

CUDA = torch.device("cuda", 0)


def fake_cuda(monkeypatch, allocator: str = "native", capability=(9, 0), triton: bool = True) -> list[dict]:
    """torch reports a CUDA GPU of `capability` with `allocator`; torch.compile records its arguments."""
    emulate_cuda(monkeypatch, allocator, capability, triton)
    monkeypatch.setattr(compiled_steps, "_compiled", {})
    calls = []

    def record(step, **kwargs):
        calls.append(kwargs)
        return step

    monkeypatch.setattr(torch, "compile", record)
    return calls


def uses_cuda_graphs(kwargs: dict) -> bool:
    options = kwargs.get("options") or {}
    return kwargs.get("mode") in (CUDA_GRAPHS, "max-autotune") or options.get("triton.cudagraphs", False)


def test_cuda_malloc_async_never_compiles_with_cuda_graphs(monkeypatch):
    calls = fake_cuda(monkeypatch, allocator="cudaMallocAsync")
    assert resolve_compile(None, CUDA) and resolve_compile(True, CUDA)
    compiled_step(lambda: None, CUDA)
    assert len(calls) == 1 and not uses_cuda_graphs(calls[0]), calls
    assert calls[0]["options"]["triton.cudagraphs"] is False  # explicit: a global setting cannot turn them on


def test_native_allocator_compiles_with_cuda_graphs(monkeypatch):
    calls = fake_cuda(monkeypatch, allocator="native")
    compiled_step(lambda: None, CUDA)
    assert calls == [{"mode": CUDA_GRAPHS, "dynamic": False}]


def test_cuda_malloc_async_is_said_on_the_loader_and_once_in_the_log(monkeypatch, caplog):
    fake_cuda(monkeypatch, allocator="cudaMallocAsync")
    monkeypatch.setattr(compile_choice, "_said", set())
    with caplog.at_level(logging.WARNING, logger=compile_choice.__name__):
        notices = [device_notice(CUDA, None), device_notice(CUDA, True)]
        resolve_compile(None, CUDA)
    assert all("cudaMallocAsync" in n and "--disable-cuda-malloc" in n for n in notices), notices
    assert [r.getMessage().count("cudaMallocAsync") for r in caplog.records] == [1]
    assert device_notice(CUDA, False) == ""  # compile off: nothing to say


def test_without_triton_runs_eager(monkeypatch):
    calls = fake_cuda(monkeypatch, triton=False)
    assert not compile_mode(CUDA).compiled
    assert not resolve_compile(None, CUDA) and not resolve_compile(True, CUDA)
    assert "Triton" in device_notice(CUDA, None)
    assert calls == []


def test_compute_capability_below_7_runs_eager(monkeypatch):
    fake_cuda(monkeypatch, capability=(6, 1))
    assert not resolve_compile(None, CUDA) and not resolve_compile(True, CUDA)
    assert "6.1" in compile_mode(CUDA).reason
    fake_cuda(monkeypatch, capability=(7, 0))
    assert resolve_compile(None, CUDA)


def test_the_cpu_compiles_with_inductor_alone_when_asked():
    mode = compile_mode(torch.device("cpu"))
    assert mode.compiled and not mode.cuda_graphs and mode.reason == ""
    assert not resolve_compile(None, torch.device("cpu")) and resolve_compile(True, torch.device("cpu"))


@pytest.fixture
def failing_compile(monkeypatch):
    """torch.compile gives steps that raise as a missing compiler would; counts the attempts."""
    monkeypatch.setattr(compiled_steps, "_compiled", {})
    attempts = []

    def broken(step, **kwargs):
        def run(*args, **kw):
            attempts.append(step.__name__)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    return attempts


@pytest.fixture
def own_model():
    """A model of its own: a failed compile turns compiling off for the model it failed on."""
    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu")


def test_a_failing_compiled_step_finishes_the_run_eager_with_the_eager_codes(failing_compile, own_model, caplog):
    eager = generate_codes(own_model, "a red apple on a table", seed=3, compile=False)
    notices = []
    with caplog.at_level(logging.WARNING, logger=compile_choice.__name__):
        first = generate_codes(own_model, "a red apple on a table", seed=3, compile=True, on_compile=lambda notice=None: notices.append(notice))
        second = generate_codes(own_model, "a red apple on a table", seed=3, compile=True, on_compile=lambda notice=None: notices.append(notice))
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert failing_compile == ["advance"]  # tried once; the later run of this model is eager at once
    failed = [n for n in notices if n is not None]
    assert len(failed) == 1 and "InvalidCxxCompiler" in failed[0] and "uncompiled" in failed[0], notices
    assert len([r for r in caplog.records if "InvalidCxxCompiler" in r.getMessage()]) == 1
    assert own_model.step_states == {}  # the failed compiled state is not kept


def test_a_failing_compiled_answer_step_finishes_the_answer_eager(failing_compile, own_model):
    photo = load_photo("chelsea")
    eager = describe_images(own_model, photo, "Describe the image.", sampling=GREEDY, max_new_tokens=8, compile=False)
    notices = []
    answers = [describe_images(own_model, photo, "Describe the image.", sampling=GREEDY, max_new_tokens=8,
                               compile=True, on_compile=lambda notice=None: notices.append(notice)) for _ in range(2)]
    assert answers == [eager, eager]
    assert failing_compile == ["decode_step"]
    assert len([n for n in notices if n is not None]) == 1, notices


def test_a_compiled_answer_step_failing_mid_answer_goes_on_eager_from_the_same_state(monkeypatch, own_model):
    """The "compiled" step here is the eager step that runs half-way (the LLM forward writes its keys
    and values into the cache) and then raises at the fourth token; the answer goes on eager from that
    state and must be the eager answer, token for token (both run the same kernels)."""
    monkeypatch.setattr(compiled_steps, "_compiled", {})
    calls = []

    def breaks_at_fourth_token(step, **kwargs):
        def run(model, state, index):
            calls.append(int(index))
            step(model, state, index)
            if int(index) == 3:
                state.logits.fill_(float("nan"))  # a half-done step leaves garbage behind
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return run

    monkeypatch.setattr(torch, "compile", breaks_at_fourth_token)
    photo = load_photo("chelsea")
    ask = dict(sampling=GREEDY, max_new_tokens=8)
    eager = describe_images(own_model, photo, "Describe the image.", compile=False, **ask)
    notices = []
    compiled = describe_images(own_model, photo, "Describe the image.", compile=True,
                               on_compile=lambda notice=None: notices.append(notice), **ask)
    assert compiled == eager
    assert calls == [0, 1, 2, 3]  # the compiled step is not called again after it failed
    assert [n for n in notices if n is not None] and "illegal memory access" in notices[-1], notices
    assert own_model.step_states == {}  # the failed state is not kept for replay


def test_device_tests_run_with_tf32_off_for_fp32_parity():
    """cuDNN's convolutions default to TF32 on Ampere and newer; the CPU references need full fp32."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_the_remedies_name_the_loaders_choice_and_the_command_lines_flag():
    """Backend messages reach ComfyUI users and command-line users alike: each remedy names the flag
    that build_parser really has beside the loader's widget."""
    from types import SimpleNamespace

    from vilau_backend.cli import build_parser
    from vilau_backend.decoding.compile_choice import fall_back
    from vilau_backend.memory.working_memory import QUANTIZE_REMEDY

    flags = build_parser()._subparsers._group_actions[0].choices["generate-image"]._option_string_actions
    notice = fall_back(SimpleNamespace(), RuntimeError("no"))
    assert "compile off on the loader, or --no-compile on the command line" in notice and "--no-compile" in flags
    assert "on the loader, or --quantize on the command line" in QUANTIZE_REMEDY and "--quantize" in flags
    assert "--num" in flags  # tasks/generate.py: "lower batch_size (--num on the command line)"
