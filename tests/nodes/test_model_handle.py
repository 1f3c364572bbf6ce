"""What the loader puts on its output: a ModelHandle per loader on a model shared by all loaders
of the same weights (nodes/model_cache.py), without ComfyUI: the shared instance is a stand-in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import pack_module

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)


class SharedModel:
    """Stands in for LoadedVilaU: one backend model, counted uses and releases."""

    def __init__(self):
        self.model = SimpleNamespace()
        self.status = "on cpu"
        self.key = "the key"
        self.releases = 0

    def ready(self):
        return self.model

    def release(self):
        self.releases += 1


def test_each_loader_keeps_its_own_compile_choice_on_a_shared_model():
    """ComfyUI re-runs only loaders whose inputs changed: whichever ran last, each handle keeps its
    own choice, which the nodes pass to each run; nothing is set on the shared model."""
    model_cache = pack_module("model_cache")
    shared = SharedModel()
    on = model_cache.ModelHandle(shared, compile=True)
    auto = model_cache.ModelHandle(shared, compile=None)
    assert (on.compile, auto.compile) == (True, None)
    assert vars(on.ready()) == vars(auto.ready()) == {}  # no choice written on the shared model
    assert on.ready() is auto.ready() is shared.model  # the weights are shared
    assert (on.status, on.key) == ("on cpu", "the key")


def test_keep_loaded_off_releases_after_the_node_only_for_its_loader():
    model_cache = pack_module("model_cache")
    shared = SharedModel()

    @model_cache.releases_after_use
    def execute(cls, model, value):
        return model.ready(), value

    assert execute(None, model_cache.ModelHandle(shared, keep_loaded=True), 1) == (shared.model, 1)
    assert shared.releases == 0
    execute(None, model_cache.ModelHandle(shared, keep_loaded=False), 2)
    assert shared.releases == 1


def test_the_loader_says_why_its_gpu_runs_compile_without_cuda_graphs(monkeypatch):
    """Under ComfyUI's default cudaMallocAsync allocator the loader node names the allocator and the
    remedy; with compile off it says nothing about compiling."""
    import torch

    from conftest import emulate_cuda

    model_cache = pack_module("model_cache")
    emulate_cuda(monkeypatch, allocator="cudaMallocAsync", capability=(8, 9))
    shared = SharedModel()
    shared.target = torch.device("cuda", 0)
    notice = model_cache.compile_notice(model_cache.ModelHandle(shared, compile=None))
    assert "cudaMallocAsync" in notice and "--disable-cuda-malloc" in notice, notice
    assert model_cache.compile_notice(model_cache.ModelHandle(shared, compile=False)) == ""


class HeldStates:
    """Stands in for VilaUModel's compiled-step states: one state holding a 400-byte cache."""

    def __init__(self):
        import torch

        self.step_states = {"key": SimpleNamespace(cache=[torch.zeros(50, dtype=torch.float64)])}

    def step_state_bytes(self):
        from vilau_backend.memory.working_memory import held_bytes

        return held_bytes(self.step_states.values())

    def release_step_states(self):
        self.step_states.clear()


def test_held_step_states_count_in_the_size_and_go_first_when_comfyui_asks_for_memory():
    model_cache = pack_module("model_cache")
    moved = []
    patcher = SimpleNamespace(model_size=lambda: 1000,
                              partially_unload=lambda device, memory, *rest: moved.append(memory) or memory)
    model = HeldStates()
    model_cache.count_step_states(patcher, model)
    assert patcher.model_size() == 1400
    assert patcher.partially_unload("cpu", 300) == 400  # the states alone are enough: no weight moves
    assert moved == [] and model.step_states == {} and patcher.model_size() == 1000
    model = HeldStates()
    model_cache.count_step_states(patcher, model)
    assert patcher.partially_unload("cpu", 1000) == 1000 and moved == [600]


def test_comfyuis_detach_frees_the_step_states_only_of_the_patcher_holding_the_weights():
    """ON_DETACH can come late, inside ComfyUI's unload: for a model already released (no weights) or for
    a patcher a reload replaced. Neither may raise, nor touch the weights or step states held now."""
    model_cache = pack_module("model_cache")
    key = model_cache.ModelKey("folder", "float32", "cpu")
    loaded = model_cache.LoadedVilaU(key, "m", "cpu")
    alive = model_cache._alive
    alive[key] = loaded
    try:
        model_cache._release(key, object(), False)  # released: nothing held, nothing to do
        loaded.model, loaded.patcher = HeldStates(), object()
        model_cache._last[:] = [loaded]
        model_cache._release(key, object(), False)  # the patcher of an earlier load
        assert loaded.model.step_states and model_cache._last == [loaded]
        model_cache._release(key, loaded.patcher, True)  # the patcher holding the weights now
        assert loaded.model.step_states == {} and model_cache._last == []
    finally:
        alive.pop(key, None)
        model_cache._last.clear()
