"""Layers streamed from CPU memory with copies that overlap the computation (vilau_backend/memory/streaming.py).

No GPU here: torch.cuda's streams and events, `Tensor.pin_memory` and `Tensor.record_stream`
are replaced by CPU-side fakes that log each call, and the CPU stands in for the GPU, so the
copies are real (CPU to CPU) and the model's outputs can be compared with the resident model's.
The log then shows the schedule a CUDA run would follow.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import replace

import pytest
import torch

from vilau_backend.memory.placement import STREAMED, apply_placement, plan_placement, remove_placement
from vilau_backend.memory.streaming import LayerStream, StreamFromCpu, plain_tensors
from vilau_backend.memory.weight_quantization import module_bytes
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.tasks.generate import ImageSampling, generate_codes
from vilau_backend.tasks.understand import GREEDY, describe_images
from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

SIZES = CheckpointSizes(llm_layers=6, llm_hidden=128)
STREAMED_LAYERS = [2, 3, 4, 5]  # the plan below: 2 resident, 4 streamed


class CudaLog:
    """What the fakes saw, in order: ("pin",), ("copy", layer, non_blocking, on_side_stream),
    ("record", stream, event), ("wait", stream, event), ("record_stream", layer, stream),
    ("forward",), ("start", layer), ("end", layer), ("live", layer, layers whose copies are alive)."""

    def __init__(self):
        self.entries: list[tuple] = []
        self.side: str | None = None  # the stream copies go to inside `torch.cuda.stream(...)`
        self.owner: dict[int, int] = {}  # data_ptr of a streamed layer's pinned tensor -> the layer
        self.copied: dict[int, int] = {}  # data_ptr of a copy -> its layer (the latest copy at that address)
        self.copies: list[tuple[int, weakref.ref]] = []  # (layer, the copy's storage)
        self.copying = 0  # copies under way

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.entries if e[0] == kind]


class FakeStream:
    def __init__(self, log: CudaLog, name: str):
        self.log, self.name = log, name

    def wait_event(self, event):
        self.log.entries.append(("wait", self.name, event.number))


class FakeEvent:
    made = 0

    def __init__(self, log: CudaLog):
        FakeEvent.made += 1
        self.log, self.number = log, FakeEvent.made

    def record(self, stream):
        self.log.entries.append(("record", stream.name, self.number))


@pytest.fixture
def cuda_log(monkeypatch) -> CudaLog:
    log = CudaLog()
    compute = FakeStream(log, "compute")
    copy_ = torch.Tensor.copy_

    @contextlib.contextmanager
    def stream(side):
        log.side = side.name
        yield
        log.side = None

    def pin_memory(tensor):
        log.entries.append(("pin",))
        return tensor.clone()

    def copy(dest, src, non_blocking=False):
        layer = log.owner.get(src.data_ptr())
        if layer is not None and not log.copying:  # a streamed layer's resting tensor
            log.entries.append(("copy", layer, non_blocking, log.side == "side"))
            log.copied[dest.data_ptr()] = layer
            log.copies.append((layer, weakref.ref(dest.untyped_storage())))
        log.copying += 1  # a torch function mode (pytest --device canary) hands the call back here once more
        try:
            return copy_(dest, src, non_blocking=non_blocking)
        finally:
            log.copying -= 1

    def record_stream(tensor, stream):
        log.entries.append(("record_stream", log.copied.get(tensor.data_ptr()), stream.name))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(log, "side"))
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    return log


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("streaming") / "m", SIZES, seed=5)


def cpu_plan(model):
    """The plan for a GPU with room for 3.5 layers, with the CPU standing in for the GPU."""
    layer = module_bytes(model.llm.model.layers[0])
    fixed = model.weight_bytes() - module_bytes(model.llm.model.layers)
    planned = plan_placement(model, {"cuda:0": fixed + int(3.5 * layer)}, "cuda:0")
    plan = replace(planned, main="cpu", layers=tuple("cpu" if d == "cuda:0" else d for d in planned.layers))
    assert [i for i, d in enumerate(plan.layers) if d == STREAMED] == STREAMED_LAYERS
    return plan


def resting_plain(layer) -> list[torch.Tensor]:
    """The plain tensors a layer's weights are stored in (not state_dict(): for a 4-bit layer repacked for
    bitsandbytes' CPU kernel it unpacks the weight as a side effect)."""
    return [plain for t in (*layer.parameters(), *layer.buffers()) for plain in plain_tensors(t)]


def know_resting(model, log: CudaLog) -> None:
    for i in STREAMED_LAYERS:
        for tensor in model.llm.model.layers[i]._hf_hook.resting.values():
            log.owner.update((plain.data_ptr(), i) for plain in plain_tensors(tensor))


def watch_layers(model, log: CudaLog) -> None:
    """Log each forward of the LLM and where each decoder layer's computation starts and ends, with the
    layers whose copies are alive when it starts."""
    def live():  # freed by reference counting, without waiting for the garbage collector
        return sorted({layer for layer, storage in log.copies if storage() is not None})

    model.llm.model.register_forward_pre_hook(lambda m, a: log.entries.append(("forward",)))
    for i, layer in enumerate(model.llm.model.layers):
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: log.entries.extend([("start", i), ("live", i, live())]))
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: log.entries.append(("end", i)))


def by_forward(entries: list[tuple]) -> list[list[tuple]]:
    parts: list[list[tuple]] = []
    for entry in entries:
        if entry[0] == "forward":
            parts.append([])
        elif parts:
            parts[-1].append(entry)
    return parts


def check_schedule(part: list[tuple], sizes: dict[int, int]) -> None:
    """One LLM forward: each streamed layer copied once, asynchronously on the side stream, the next layer's
    copy issued before this layer's computation ends, each used after waiting on its event, recorded on the
    compute stream after use, and freed by the time the layer after the next one starts."""
    where = {e: k for k, e in enumerate(part) if e[0] in ("start", "end")}
    copies = [(k, e) for k, e in enumerate(part) if e[0] == "copy"]
    for layer in STREAMED_LAYERS:
        own = [k for k, e in copies if e[1] == layer]
        assert len(own) == sizes[layer], f"layer {layer}: {len(own)} tensor copies in one forward, not {sizes[layer]}"
        assert all(e[2] and e[3] for _, e in copies), "a copy was blocking or not on the side stream"
        if layer + 1 in STREAMED_LAYERS:
            ahead = [k for k, e in copies if e[1] == layer + 1]
            assert max(ahead) < where[("end", layer)], f"layer {layer + 1} was copied after layer {layer} computed"
        event = next(e[2] for e in part[max(own):] if e[0] == "record")
        waited = [k for k, e in enumerate(part) if e == ("wait", "compute", event)]
        assert waited and waited[0] < where[("start", layer)], f"layer {layer} computed before waiting for its copy"
        recorded = [k for k, e in enumerate(part) if e == ("record_stream", layer, "compute")]
        assert len(recorded) == sizes[layer] and min(recorded) > where[("end", layer)]
        live = next(e[2] for e in part if e[:2] == ("live", layer))
        assert set(live) <= {layer, layer + 1}, f"when layer {layer} starts, copies of {live} are alive"


@pytest.mark.parametrize("quantize", ["none", "int8", "4bit"])
def test_each_streamed_layer_is_copied_once_per_forward_while_the_one_before_computes(checkpoint, quantize, cuda_log):
    model = VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize=quantize)
    layers = model.llm.model.layers
    sizes = {i: len(resting_plain(layers[i])) for i in STREAMED_LAYERS}
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    apply_placement(model, cpu_plan(model), overlap=True)
    try:
        assert len(cuda_log.of("pin")) == sum(sizes.values()), "the resting tensors are pinned once, when placed"
        know_resting(model, cuda_log)
        watch_layers(model, cuda_log)
        describe_images(model, image, "what is it?", sampling=GREEDY, max_new_tokens=3)
    finally:
        remove_placement(model)
    forwards = by_forward(cuda_log.entries)
    assert len(forwards) >= 3  # prefill and the steps
    for part in forwards:
        check_schedule(part, sizes)
    assert len(cuda_log.of("pin")) == sum(sizes.values()), "pinned again while running"
    gc.collect()
    assert all(storage() is None for _, storage in cuda_log.copies), "copies outlived the run"


@pytest.mark.parametrize("quantize", ["none", "int8", "4bit"])
def test_overlapped_streaming_gives_the_resident_models_codes_and_answers(checkpoint, quantize, cuda_log):
    model = VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize=quantize)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    sampling = ImageSampling(top_k=1)
    codes = generate_codes(model, "a red apple", sampling=sampling)
    answer = describe_images(model, image, "what is it?", sampling=GREEDY, max_new_tokens=8)[0].output_ids
    before = [t.clone() for t in resting_plain(model.llm.model.layers[5])]
    apply_placement(model, cpu_plan(model), overlap=True)
    know_resting(model, cuda_log)
    try:
        assert torch.equal(generate_codes(model, "a red apple", sampling=sampling), codes)
        assert describe_images(model, image, "what is it?", sampling=GREEDY, max_new_tokens=8)[0].output_ids == answer
        assert len(cuda_log.of("copy")) > len(cuda_log.of("pin")) > 0
    finally:
        remove_placement(model)
    after = resting_plain(model.llm.model.layers[5])
    assert len(after) == len(before) and all(map(torch.equal, after, before)), "streaming changed the resting weights"


def test_copies_overlap_only_where_cuda_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: "side stream")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not LayerStream("cuda:0").overlap and LayerStream("cuda:0").side is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert LayerStream("cuda:0").overlap and LayerStream("cuda:0").side == "side stream"
    assert not LayerStream("cpu").overlap


def test_without_cuda_nothing_is_pinned_and_the_hook_runs_the_layer_in_place(checkpoint, monkeypatch):
    def refuse(tensor):
        raise AssertionError("pin_memory needs CUDA")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    model = VilaUModel.load(checkpoint, dtype="float32", device="cpu")
    layer = model.llm.model.layers[5]
    x = torch.randn(1, 3, SIZES.llm_hidden, generator=torch.Generator().manual_seed(1))
    position = model.llm.model.rotary_emb(x, torch.arange(3)[None])
    with torch.inference_mode():
        expected = layer(x, position_embeddings=position)
    apply_placement(model, cpu_plan(model))
    try:
        assert isinstance(layer._hf_hook, StreamFromCpu) and not layer._hf_hook.stream.overlap
        with torch.inference_mode():
            streamed = layer(x, position_embeddings=position)
    finally:
        remove_placement(model)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 (transformers 4.50 returns a tuple)
    assert torch.equal(first(streamed), first(expected))
