"""Shared fixtures: the golden checkpoint recorded from the original implementation, and small random
checkpoints we write (`small_checkpoint`, vilau_backend/testing/random_checkpoint.py).

Markers: `comfyui` marks the tests that start the pinned ComfyUI (or install into its
environment). dev/scripts/run_tests.sh runs every other test again under transformers 4.50.3,
so a new backend test file joins that pass without being listed anywhere.

`--device cuda` (or VILAU_TEST_DEVICE=cuda) loads the fixtures' models (golden_fp32, golden_bf16,
small_model) on that device instead of the CPU (dev/bench/gpu_check.sh runs the backend tests so).
Tests that build their own modules stay on the CPU. References, inputs and the tests' own tensors are
on the CPU, so a test compares on the CPU: model results are moved with `.cpu()` first (CUDA raises on
any operation mixing the two). fp32 parity also needs TF32 off (pytest_configure).
`--device canary` proves that without a GPU: the same models on the CPU, their tensors marked as
living on a device of their own, and any operation mixing them with the CPU raising as CUDA would
(tests/device_canary.py says how). Run it over the tests that use those fixtures:
`pytest --device canary tests/backend tests/nodes`; a `MixedDevices` error names the mix.

Comparing floating-point results of two computation paths (cached vs recomputed, prefilled vs
stepped, batched vs alone, compiled vs eager, quantized vs full, ours vs the original's
recording): the two paths sum in other orders, and another CPU's kernels (AVX2, AVX-512, AMX,
oneDNN, other thread counts) choose other orders again. A bound measured on one machine is not
a bound. The rule:

1. Values: bound the difference by the arithmetic, `rounding_bound(scale, reduction, steps)`:
   a dot product of length n rounds to within n*u*sum|a*b| (u the unit roundoff of the dtype),
   whatever its order, so two orders differ by at most twice that; a result that went through
   `steps` such reductions in sequence carries each one's error, relative to the scale of the
   values at the end (normalisations keep the scales comparable). `scale` is sum|a*b| of the
   last reduction, per value (`linear_input_scales` records it for a Linear).
2. Decisions: where values are tokens or codes, assert equality only where the decision's margin
   (top-1 minus top-2 logit, or a uniform's distance to a boundary of the cumulative distribution)
   exceeds that bound, and require that most decisions are that clear, so the test keeps its power.
3. A measured figure may be printed or quoted beside a bound, never used as one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

FIXTURE = Path(__file__).parent / "fixtures" / "vilau-tiny-256"  # the golden data, named as its recording names it
GOLDEN_CHECKPOINT = FIXTURE / "checkpoint"
REFERENCE = FIXTURE / "reference"
FRAMES_DIR = REFERENCE / "inputs" / "video_frames"  # the 12 frames of the recorded video runs
CANARY = "canary"  # --device canary: tests/device_canary.py


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "comfyui: starts the pinned ComfyUI or installs into its environment (not in the transformers 4.50.3 pass)"
    )
    config.addinivalue_line(
        "markers", "compiler_output: asserts on what dynamo produced (graphs, breaks, recompiles) and compares no "
        "tensors; left out of --device canary, which runs the compiled steps eagerly"
    )
    config.addinivalue_line(
        "markers", "no_transformers: depends on nothing transformers does (the pack's own networks, sampling, files, "
        "code checks, dev scripts), so the transformers 4.50.3 pass leaves it out"
    )
    # fp32 parity with the CPU references under --device cuda: cuDNN convolutions (and matmuls where
    # enabled) default to TF32, whose 10-bit mantissa errs by ~1e-3 relative, far beyond 1e-5 tolerances
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == CANARY:
        left_out = [item for item in items if item.get_closest_marker("compiler_output")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not item.get_closest_marker("compiler_output")]


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=os.environ.get("VILAU_TEST_DEVICE", "cpu"),
        help="device of the test models: cpu (default), cuda, cuda:1, ...; canary: the CPU, marked as another "
             "device, so that a test mixing the two fails (tests/device_canary.py)",
    )


@pytest.fixture(scope="session", autouse=True)
def compile_cache_folder(tmp_path_factory):
    """Compiled steps saved beside pytest's temporary folders, not in the user's cache: kept from one
    test session to the next on a machine, as a user's are from one process to the next."""
    from vilau_backend.decoding import compile_cache

    previous = compile_cache.use_folder(tmp_path_factory.getbasetemp().parent / "vilau-compile-cache")
    yield
    compile_cache.use_folder(previous)


@pytest.fixture(scope="session", autouse=True)
def no_quantized_cache():
    """Quantized loads quantize, as they always did, unless a test names a `quantized_cache` folder: the
    default ('auto', the user's cache folder) is off in tests, so no test reads another's copy or writes
    into the home folder."""
    from vilau_backend.memory import quantized_cache

    previous = quantized_cache.use_default_folder(None)
    yield
    quantized_cache.restore_default_folder(previous)


@pytest.fixture(scope="session")
def model_device(request) -> str:
    device = request.config.getoption("--device")
    return "cpu" if device == CANARY else device


def on_test_device(request, model):
    """A fixture model loaded on `model_device`; under the canary, its tensors marked as on the model's device."""
    if request.config.getoption("--device") == CANARY:
        from device_canary import place_model

        place_model(model.networks)
    return model


def on_device(model, tensor: torch.Tensor) -> torch.Tensor:
    """A test's input moved to the model's device, for a test that feeds the model's parts directly
    (the backend's task functions move their inputs themselves)."""
    return tensor.to(model.device)


@pytest.fixture(scope="session", autouse=True)
def device_canary(request):
    """Under --device canary, the whole session runs inside the canary, fixtures included (a module's shared
    result computed by a fixture model is on the model's device, as under --device cuda). The compiled steps
    run eagerly there, so that the canary sees inside them (dynamo would trace the canary into their graphs);
    the tests of what the compiler produced (marked compiler_output) compare no tensors and are left out."""
    if request.config.getoption("--device") != CANARY:
        yield
        return
    from device_canary import DeviceCanary

    set_stance = getattr(torch.compiler, "set_stance", None)  # torch 2.6 and newer
    eager = set_stance("force_eager") if set_stance else torch._dynamo.config.patch(disable=True)
    with eager, DeviceCanary():
        yield


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rounding_bound(scale: torch.Tensor, reduction: int, steps: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The largest difference two correct evaluations of the same values may show (the rule above):
    `scale` is sum|a*b| of each value's last reduction, `reduction` the longest reduction length on the
    way, `steps` the number of reductions in sequence."""
    return 2 * steps * reduction * UNIT_ROUNDOFF[dtype] * scale.float()


class linear_input_scales:
    """Records sum|x*W| + |b| of every call of `linear` inside the `with` block: the scale of its outputs
    for `rounding_bound`. `scales` holds one (..., out_features) tensor per call."""

    def __init__(self, linear: torch.nn.Linear):
        self.linear, self.scales = linear, []

    def __enter__(self):
        @torch.no_grad()
        def record(module, args, output):
            weight, bias = module.weight, module.bias
            weight = (weight.dequantize() if hasattr(weight, "dequantize") else weight).float()  # int8 weights too
            scale = args[0].float().abs() @ weight.abs().T
            self.scales.append(scale + (0 if bias is None else bias.float().abs()))

        self.handle = self.linear.register_forward_hook(record)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height, with almost no pixel data: decoding it would
    allocate the whole image, reading its header costs nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path



def guided_rounding_bound(depth, scales: torch.Tensor, cfg: float) -> torch.Tensor:
    """fp32 bound on how far two correct evaluations of the depth transformer's guided logits may differ:
    `scales` (R, ..., V) are the classifier's sum|x*W| + |b|; guidance weighs the conditional rows by cfg
    and the unconditional by |1 - cfg|. The longest reduction is the MLP's 4E; in sequence run in_mlp, per
    block q/k/v, scores, weighted values, proj and the two MLP layers, then the classifier."""
    cond, uncond = scales.chunk(2)
    spec = depth.spec
    reduction = max(4 * spec.embed_dim, spec.llm_dim, spec.code_dim)
    return rounding_bound(cfg * cond + abs(1 - cfg) * uncond, reduction, steps=2 + 6 * spec.n_layer)


def projected_feature_bound(model, codes: torch.Tensor) -> tuple[torch.Tensor, "linear_input_scales"]:
    """fp32 bound on two evaluations of `model.project(codes_to_features(codes))` (rule above): the codes'
    summed embedding (a reduction of length D) through the projector's Linears (the longest reduction is
    the wider of its widths). Returns the bound (..., out), on the CPU, and the projected features it bounds,
    on the model's device."""
    projector = model.projector.layers
    last = projector[-1] if isinstance(projector, torch.nn.Sequential) else projector
    linears = [m for m in model.projector.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode(), linear_input_scales(last) as scales:
        projected = model.project(model.codes_to_features(codes).flatten(1, -2))
    reduction = max(model.config.quantizer.depth, *(m.in_features for m in linears))
    return rounding_bound(scales.scales[0], reduction, steps=1 + len(linears)).cpu(), projected


class llm_hidden_bounds:
    """Inside the `with` block, each forward of `model.llm` appends to `bounds` an fp32 bound (R, H) on its
    last position's hidden state (after the final RMSNorm), by the rule above. The residual stream x is a sum
    of the embedding and, per layer, the attention's o_proj and the MLP's down_proj outputs, so its scale is
    |x| plus their sum|a*b|; the reductions in sequence are six per layer (q/k/v, scores, weighted values,
    o_proj, gate/up, down_proj) and the norm's; the longest is the widest of H, the MLP width and the cache.
    The norm divides by rms(x): an error e in x moves h = w*x/rms(x) by |w|(e + |x| max(e)/rms)/rms."""

    def __init__(self, model, cache_length: int):
        llm = model.llm
        config = llm.config
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        self.reduction = max(config.hidden_size, config.intermediate_size, cache_length)
        self.steps = 6 * len(self.layers) + 1
        self.bounds: list[torch.Tensor] = []
        self._residual_scales: list[torch.Tensor] = []

    def __enter__(self):
        @torch.no_grad()
        def record_linear(module, args, output):
            x = args[0][:, -1].float()  # (R, in): the last position
            self._residual_scales.append(x.abs() @ module.weight.float().abs().T)

        @torch.no_grad()
        def record_norm(module, args, output):
            x = args[0][:, -1].float()  # (R, H)
            scale = x.abs() + sum(self._residual_scales)
            self._residual_scales.clear()
            error = rounding_bound(scale, self.reduction, self.steps)  # (R, H) on x
            rms = x.pow(2).mean(-1, keepdim=True).add(module.variance_epsilon).sqrt()
            weight = module.weight.float().abs()
            self.bounds.append(weight * (error + x.abs() * error.amax(-1, keepdim=True) / rms) / rms)

        self.handles = [self.norm.register_forward_hook(record_norm)]
        for layer in self.layers:
            self.handles += [layer.self_attn.o_proj.register_forward_hook(record_linear),
                             layer.mlp.down_proj.register_forward_hook(record_linear)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class logit_bounds(llm_hidden_bounds):
    """llm_hidden_bounds carried through the text head: each forward appends to `logits` an fp32 bound
    (R, V) on its last position's logits, the hidden state's bound times |W| plus the head's own rounding."""

    def __init__(self, model, cache_length: int):
        super().__init__(model, cache_length)
        self.head = model.llm.lm_head
        self.logits: list[torch.Tensor] = []

    def __enter__(self):
        super().__enter__()

        @torch.no_grad()
        def record_head(module, args, output):
            h = args[0] if args[0].dim() == 2 else args[0][:, -1]  # (R, H): the last position
            h, weight = h.float(), module.weight.float().abs()  # (R, H), (V, H)
            own = rounding_bound(h.abs() @ weight.T, reduction=weight.shape[1])
            self.logits.append(self.bounds[-1] @ weight.T + own)

        self.handles.append(self.head.register_forward_hook(record_head))
        return self


def reference(name: str) -> dict:
    from safetensors.torch import load_file

    # clone: mmap-loaded tensors can be mis-aligned, which changes fp32 GEMMs at ulp level
    return {k: v.clone() for k, v in load_file(str(REFERENCE / name)).items()}


def recorded(name: str) -> dict:
    """A JSON record of the original's run, `reference/<name>.json`."""
    return json.loads((REFERENCE / f"{name}.json").read_text(encoding="utf-8"))


def load_photo(name: str) -> torch.Tensor:
    """A PNG as ComfyUI's LoadImage gives it: (1, H, W, 3) float32 k/255."""
    array = np.asarray(Image.open(REFERENCE / "inputs" / f"{name}.png").convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


@pytest.fixture(scope="session")
def golden_fp32(request, model_device):
    from vilau_backend.model.vila_u import VilaUModel

    return on_test_device(request, VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device=model_device))


@pytest.fixture(scope="session")
def golden_bf16(request, model_device):
    from vilau_backend.model.vila_u import VilaUModel

    return on_test_device(request, VilaUModel.load(GOLDEN_CHECKPOINT, dtype="bfloat16", device=model_device))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    from vilau_backend.testing.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("small") / "vila-u-small")


@pytest.fixture(scope="session")
def small_model(request, small_checkpoint, model_device):
    from vilau_backend.model.vila_u import VilaUModel

    return on_test_device(request, VilaUModel.load(small_checkpoint, dtype="float32", device=model_device))


def pack_module(name: str):
    """A module of the pack's nodes/ package without running nodes/__init__.py (which needs
    ComfyUI): the repository is registered as the package `vilau_pack`, as ComfyUI registers a pack."""
    import importlib
    import types

    for package, path in (("vilau_pack", REPO), ("vilau_pack.nodes", REPO / "nodes")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(path)]
            sys.modules[package] = module
    return importlib.import_module(f"vilau_pack.nodes.{name}")


def with_eos(model, eos: int):
    """A shallow copy of `model` whose tokenizer says that `eos` ends an answer (and decodes as the model's)."""
    import copy
    from types import SimpleNamespace

    pretend = copy.copy(model)
    pretend.tokenizer = SimpleNamespace(eos_token_id=eos, decode=model.tokenizer.decode)
    return pretend


def clear_steps(model, prompts, outputs: list[list[int]]) -> list[list[bool]]:
    """For each step of the eager loop that gave `outputs` (teacher-forced; a stopped row is fed its EOS,
    as generate_texts does), whether its decision was clear: the gap between the two best tokens' logits
    exceeds both logits' rounding bounds (logit_bounds, over a cache as long as a compiled step's bucket),
    so no other correct order of summation could flip it."""
    from vilau_backend.decoding.answer_loop import AnswerSteps
    from vilau_backend.decoding.compiled_steps import cache_length

    steps = max(len(o) for o in outputs)
    clear: list[list[bool]] = [[] for _ in outputs]
    with torch.inference_mode(), logit_bounds(model, cache_length(max(p.shape[0] for p in prompts), steps)) as bounds:
        run = AnswerSteps(model, prompts, steps)  # eager
        logits = run.prefill()  # (B, V)
        for step in range(steps):
            top2 = logits.topk(2, dim=-1)  # (B, 2)
            margin = top2.values[:, 0] - top2.values[:, 1] - bounds.logits[-1].gather(1, top2.indices).sum(-1)  # (B,)
            for b, o in enumerate(outputs):
                if step < len(o):
                    clear[b].append(bool(margin[b] > 0))
            tokens = torch.tensor([o[min(step, len(o) - 1)] for o in outputs])
            logits = run.step(tokens, step)
    return clear


def first_unclear_steps(model, prompts, outputs: list[list[int]], at_least: float = 0.5) -> list[int]:
    """Per row, the first step whose decision is not clear (len(output) when all are): two correct runs
    agree token for token up to there. Fails when fewer than `at_least` of all decisions are clear (the
    comparison would then prove little)."""
    clear = clear_steps(model, prompts, outputs)
    flat = [c for row in clear for c in row]
    assert sum(flat) >= at_least * len(flat), f"only {sum(flat)} of {len(flat)} decisions clear of rounding"
    return [row.index(False) if False in row else len(row) for row in clear]


def emulate_cuda(monkeypatch, allocator: str = "native", capability=(9, 0), triton: bool = True) -> None:
    """torch reports a CUDA GPU of `capability`, the caching `allocator` backend and whether Triton is
    installed, as a ComfyUI user's process would (nothing runs on it)."""
    from torch.utils import _triton

    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: allocator)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(_triton, "has_triton_package", lambda: triton)
