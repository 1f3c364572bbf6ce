"""Quantized layers kept on disk (vilau_backend/memory/quantized_cache.py): a load from the copy equals a
fresh quantized load bit for bit, a stale or damaged copy is never used, writing is atomic and a folder
that can't be written costs a warning, not the load; and layers are quantized on the device the model
runs on, one at a time (emulated on the CPU).

The checkpoint's targeted layers are all multiples of 64 wide, so 4-bit quantizes every one of them on
both of bitsandbytes' CPU paths (tests/backend/test_quantize.py says why that matters).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import weakref
from pathlib import Path

import pytest
import torch

from vilau_backend.memory import quantized_cache, weight_quantization
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.tasks.generate import generate_codes
from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

SIZES_64 = CheckpointSizes(llm_hidden=128, depth_width=64)
CACHE_LOG = "vilau_backend.memory.quantized_cache"


@pytest.fixture
def checkpoint(tmp_path):
    return write_random_checkpoint(tmp_path / "model", SIZES_64, seed=3)


def load(checkpoint, scheme, cache, cpu_kernel: bool | None = None) -> VilaUModel:
    """cpu_kernel True/False forces bitsandbytes' "does this CPU have AVX512-BF16" (its CPU path)."""
    with pytest.MonkeyPatch.context() as patch:
        if cpu_kernel is not None:
            import bitsandbytes.nn.modules

            patch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: cpu_kernel)
        return VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize=scheme, quantized_cache=cache)


class quantize_calls:
    """Counts fresh quantizations inside the `with` block."""

    def __init__(self, monkeypatch):
        self.count, real = 0, weight_quantization.quantize_linear

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(weight_quantization, "quantize_linear", counted)


def quantized_layers(model: VilaUModel) -> dict[str, torch.nn.Module]:
    found = {f"llm.{n}": m for n, m in model.llm.named_modules() if weight_quantization.LLM_TARGETS.match(n)}
    found.update({f"depth.{n}": m for n, m in model.vision.depth.named_modules()
                  if weight_quantization.DEPTH_TARGETS.match(n)})
    return {n: m for n, m in found.items() if isinstance(m, torch.nn.Linear)}  # Linear4bit is a Linear


def stored_form(layer: torch.nn.Module) -> dict[str, object]:
    """Everything a quantized layer holds, as it holds it (bitsandbytes' repacked CPU layout included):
    torchao's tensor components, or bitsandbytes' weight bytes and every field of its quant state."""
    weight = layer.weight
    if hasattr(weight, "__tensor_flatten__"):
        names, attributes = weight.__tensor_flatten__()
        form = {name: getattr(weight, name) for name in names}
        form["attributes"] = repr(attributes)
    else:
        form = {"data": weight.data, **_fields("state", weight.quant_state)}
    if layer.bias is not None:
        form["bias"] = layer.bias
    return form


def _fields(prefix: str, state) -> dict[str, object]:
    form = {}
    for key, value in vars(state).items():
        if type(value).__name__ == "QuantState":
            form.update(_fields(f"{prefix}.{key}", value))
        else:
            form[f"{prefix}.{key}"] = value
    return form


def assert_same_layers(expected: VilaUModel, actual: VilaUModel) -> None:
    want, got = quantized_layers(expected), quantized_layers(actual)
    assert sorted(want) == sorted(got)
    for name in want:
        assert type(got[name]) is type(want[name]), name
        a, b = stored_form(want[name]), stored_form(got[name])
        assert sorted(a) == sorted(b), name
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (name, key)
                assert torch.equal(a[key].view(torch.uint8) if a[key].dtype == torch.bfloat16 else a[key],
                                   b[key].view(torch.uint8) if b[key].dtype == torch.bfloat16 else b[key]), (name, key)
            else:
                assert a[key] == b[key], (name, key)


def codes_of(model: VilaUModel) -> torch.Tensor:
    return generate_codes(model, "a red apple on a table", num_images=1, seed=7)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("scheme, cpu_kernel", [("int8", None), ("4bit", False), ("4bit", True)],
                         ids=["int8", "4bit-dequantize-path", "4bit-fused-cpu-kernel"])
def test_a_load_from_the_copy_equals_a_fresh_quantized_load(checkpoint, tmp_path, monkeypatch, scheme, cpu_kernel):
    cache = tmp_path / "cache"
    fresh = load(checkpoint, scheme, None, cpu_kernel)
    first = load(checkpoint, scheme, cache, cpu_kernel)  # quantizes, and writes the copy
    assert len(entries(cache)) == 1, entries(cache)
    calls = quantize_calls(monkeypatch)
    cached = load(checkpoint, scheme, cache, cpu_kernel)
    assert calls.count == 0  # nothing quantized: every layer came from the copy
    assert len(quantized_layers(cached)) == 27  # per LLM layer q k v o gate up down; per depth block 6; head
    assert_same_layers(fresh, first)
    assert_same_layers(fresh, cached)
    assert torch.equal(codes_of(fresh), codes_of(cached))
    assert_same_layers(fresh, cached)  # still, after running (bitsandbytes repacks at a first CPU forward)


def test_each_choice_has_its_own_entry(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    load(checkpoint, "int8", cache)
    load(checkpoint, "4bit", cache, cpu_kernel=False)
    load(checkpoint, "4bit", cache, cpu_kernel=True)
    VilaUModel.load(checkpoint, dtype="bfloat16", device="cpu", quantize="int8", quantized_cache=cache)
    names = entries(cache)
    assert [n.split("-", 2)[2] for n in names] == ["4bit-float32-cpu", "4bit-float32-cpu-avx512bf16",
                                                   "int8-bfloat16-cpu", "int8-float32-cpu"], names


def _rewrite_keeping_size_and_time(path: Path) -> None:
    """Other weights in the same file layout: same size, modification time put back."""
    from safetensors.torch import load_file, save_file

    stat = path.stat()
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = -tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("change", ["same-size-and-time", "touched"])
def test_a_copy_of_a_changed_checkpoint_is_not_used(checkpoint, tmp_path, monkeypatch, change):
    cache = tmp_path / "cache"
    load(checkpoint, "int8", cache)
    weights = checkpoint / "llm" / "model.safetensors"
    if change == "touched":
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    else:
        _rewrite_keeping_size_and_time(weights)
    calls = quantize_calls(monkeypatch)
    reloaded = load(checkpoint, "int8", cache)
    assert calls.count == 27  # quantized again
    assert_same_layers(load(checkpoint, "int8", None), reloaded)
    assert len(entries(cache)) == 1, entries(cache)  # the new copy replaced the stale one
    calls.count = 0
    load(checkpoint, "int8", cache)
    assert calls.count == 0  # and is used from then on


def _entry(cache: Path) -> Path:
    (name,) = entries(cache)
    return cache / name


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "manifest-garbage"])
def test_a_damaged_copy_is_ignored_and_rewritten(checkpoint, tmp_path, monkeypatch, caplog, damage):
    cache = tmp_path / "cache"
    fresh = load(checkpoint, "int8", cache)
    entry = _entry(cache)
    target = entry / "0001.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flipped-byte":
        data[-5] ^= 0x40  # inside the last tensor's data: same size, header intact
        target.write_bytes(data)
    else:
        (entry / "manifest.json").write_text("{not json", encoding="utf-8")
    calls = quantize_calls(monkeypatch)
    with caplog.at_level(logging.WARNING):
        reloaded = load(checkpoint, "int8", cache)
    assert calls.count == 27
    assert any("quantizing again and rewriting it" in r.getMessage() for r in caplog.records), caplog.records
    assert_same_layers(fresh, reloaded)
    assert target.read_bytes() != bytes(data) or damage == "manifest-garbage"
    calls.count = 0
    again = load(checkpoint, "int8", cache)
    assert calls.count == 0  # the rewritten copy passes its checks
    assert_same_layers(fresh, again)


def test_nothing_appears_under_the_entry_name_until_the_copy_is_complete(checkpoint, tmp_path, monkeypatch):
    import safetensors.torch

    cache = tmp_path / "cache"
    seen, real = [], safetensors.torch.save_file

    def watched(tensors, filename, metadata=None):
        seen.append((Path(filename).parent.name, entries(cache)))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", watched)
    load(checkpoint, "int8", cache)
    assert len(seen) == 4  # one file per LLM layer (2) and per part of the depth transformer (2)
    for folder, visible in seen:
        assert folder.startswith(".writing-") and visible == [folder], (folder, visible)
    (name,) = entries(cache)  # the writing folder became the entry, whole
    manifest = json.loads((cache / name / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["0000.safetensors", "0001.safetensors", "0002.safetensors",
                                         "0003.safetensors"]


def test_a_write_that_fails_midway_leaves_no_entry_and_the_load_goes_on(checkpoint, tmp_path, monkeypatch, caplog):
    """A full disk at the second file: the model loads as without a cache, one warning per folder and process,
    nothing left in the folder."""
    import safetensors.torch

    cache = tmp_path / "cache"
    real, written = safetensors.torch.save_file, []

    def disk_full(tensors, filename, metadata=None):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    monkeypatch.setattr(quantized_cache, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        first = load(checkpoint, "int8", cache)
        load(checkpoint, "int8", cache)
    assert entries(cache) == []
    messages = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]
    assert len(messages) == 1 and "No space left on device" in messages[0] and str(cache) in messages[0], messages
    assert_same_layers(load(checkpoint, "int8", None), first)


def test_a_folder_that_cannot_be_made_costs_a_warning_not_the_load(checkpoint, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(quantized_cache, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        model = load(checkpoint, "4bit", blocked / "quantized", cpu_kernel=False)
    assert len(quantized_layers(model)) == 27
    assert [r.levelname for r in caplog.records if r.name == CACHE_LOG] == ["WARNING"]


def test_a_library_release_that_cannot_serialise_its_layers_only_turns_the_copy_off(checkpoint, tmp_path,
                                                                                    monkeypatch, caplog):
    """torchao releases before its safetensors support (or a tensor type it does not list) load as before."""
    def unsupported(*args):
        raise ImportError("No module named 'torchao.prototype.safetensors'")

    monkeypatch.setattr(weight_quantization, "layer_tensors", unsupported)
    monkeypatch.setattr(quantized_cache, "_warned", set())
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        model = load(checkpoint, "int8", cache)
    assert entries(cache) == []
    messages = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]
    assert len(messages) == 1 and "cannot serialise its layers" in messages[0], messages
    assert_same_layers(load(checkpoint, "int8", None), model)


def test_auto_is_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    previous = quantized_cache.use_default_folder(None)
    quantized_cache.restore_default_folder({})
    try:
        assert quantized_cache.resolve_folder("auto") == tmp_path / "vila-u" / "quantized"
    finally:
        quantized_cache.restore_default_folder(previous)
    assert quantized_cache.resolve_folder(None) is None


# ---- quantizing on the device the model runs on (emulated: nothing here has a GPU) -------------------------


class emulated_gpu_moves:
    """`Module.to(<cuda>)` only marks the module as on the GPU (the weights stay in CPU memory), and a move
    back unmarks it: which device each layer was on when it was quantized can then be checked on the CPU."""

    def __init__(self, monkeypatch):
        real = torch.nn.Module.to

        def to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None and device.type == "cuda":
                module._emulated_device = device
                return module
            module.__dict__.pop("_emulated_device", None)
            return real(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)


def test_layers_are_quantized_on_the_run_device_one_full_precision_weight_at_a_time(checkpoint, monkeypatch):
    emulated_gpu_moves(monkeypatch)
    full_precision: list[weakref.ref] = []  # every targeted Linear's weight as loaded
    where, alive_at_each_call = [], []
    real = weight_quantization.quantize_linear

    def watched(linear, scheme, dtype):
        where.append(getattr(linear, "_emulated_device", linear.weight.device))
        full_precision.append(weakref.ref(linear.weight))
        alive_at_each_call.append(sum(ref() is not None for ref in full_precision))
        return real(linear, scheme, dtype)

    monkeypatch.setattr(weight_quantization, "quantize_linear", watched)
    model = VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize="int8", run_device="cuda:0",
                            quantized_cache=None)
    assert len(where) == 27 and set(where) == {torch.device("cuda:0")}, where
    assert alive_at_each_call == [1] * 27  # the previous layer's full-precision weight is gone each time
    for name, layer in quantized_layers(model).items():
        assert "_emulated_device" not in vars(layer), name  # moved back to where the weights rest
        assert layer.weight.qdata.device.type == "cpu", name
