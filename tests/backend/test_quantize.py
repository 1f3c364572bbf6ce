"""quantize='int8' / '4bit': which weights are quantized, how much memory they take, and how far decisions move.

Tolerances are measured on the golden checkpoint (dev/bench/quality.py prints the same
figures; README.md has them for larger models): a random-weight model this small has
near-uniform depth distributions, so many decisions are near-ties and agreement is
lower than on a trained model; the bounds leave room for other CPUs' kernels.

bitsandbytes runs 4-bit layers on the CPU along one of two paths, chosen from the CPU:
a fused kernel on CPUs with AVX512-BF16 (bf16 arithmetic, repacked weights that need
out_features % 32 == 0 and in_features % 64 == 0) and a dequantize-then-matmul path
elsewhere. The golden figures are taken on the second path on every CPU (forced), so
they do not depend on which CPU runs the tests; the first path's layer choice is tested
with the CPU's answer forced both ways, and a model whose shapes it takes runs on
whichever path this CPU has.
"""

from __future__ import annotations

import builtins
import logging

import pytest
import torch

from dev.bench.quality import compare, guided_depth_logits
from conftest import GOLDEN_CHECKPOINT, guided_rounding_bound, linear_input_scales
from vilau_backend.decoding.compiled_steps import cpu_inductor_options
from vilau_backend.errors import InputError
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.memory.weight_quantization import check_quantize, module_bytes, tensor_bytes
from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint

# every targeted Linear a multiple of 64 on both sides, as in real checkpoints
SIZES_64 = CheckpointSizes(llm_hidden=128, depth_width=64)


def load_4bit(checkpoint, cpu_kernel: bool | None = None) -> VilaUModel:
    """A 4-bit model; cpu_kernel True/False forces bitsandbytes' answer to "does this CPU have
    AVX512-BF16" (which picks its CPU path), None leaves it to the CPU."""
    with pytest.MonkeyPatch.context() as patch:
        if cpu_kernel is not None:
            import bitsandbytes.nn.modules

            patch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: cpu_kernel)
        return VilaUModel.load(checkpoint, dtype="float32", device="cpu", quantize="4bit")


@pytest.fixture(scope="module")
def golden_int8():
    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu", quantize="int8")


@pytest.fixture(scope="module")
def golden_4bit():
    return load_4bit(GOLDEN_CHECKPOINT, cpu_kernel=False)


@pytest.fixture(scope="module")
def checkpoint_64(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sizes64") / "m", SIZES_64, seed=3)


def _targeted_linears(model: VilaUModel) -> dict[str, torch.nn.Module]:
    from vilau_backend.memory.weight_quantization import DEPTH_TARGETS, LLM_TARGETS

    found = {f"llm.{n}": m for n, m in model.llm.named_modules() if LLM_TARGETS.match(n)}
    found.update({f"depth.{n}": m for n, m in model.vision.depth.named_modules() if DEPTH_TARGETS.match(n)})
    return {n: m for n, m in found.items() if isinstance(m, torch.nn.Linear) or "Linear4bit" in type(m).__name__}


def _stored_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in module.state_dict().values()}


def test_int8_quantizes_llm_layers_and_depth_blocks_only(golden_int8):
    from torchao.utils import TorchAOBaseTensor

    llm, depth = golden_int8.llm, golden_int8.vision.depth
    for linear in (llm.model.layers[0].self_attn.q_proj, llm.model.layers[1].mlp.down_proj,
                   depth.head_transformer.blocks[0].attn.key, depth.classifier_mlp.linear):
        assert isinstance(linear.weight, TorchAOBaseTensor) and linear.weight.qdata.dtype == torch.int8
    # the text head, embeddings, vision tower, depth input layers and projector keep the compute dtype
    for module in (llm.lm_head, llm.model.embed_tokens, golden_int8.vision.siglip, golden_int8.vision.pixel_decoder,
                   depth.in_mlp_1, depth.in_mlp_2, golden_int8.projector):
        assert _stored_dtypes(module) == {torch.float32}, module


def test_4bit_packs_two_weights_per_byte_on_the_cpu(golden_4bit):
    import bitsandbytes as bnb

    q_proj = golden_4bit.llm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.numel() == q_proj.in_features * q_proj.out_features // 2


def test_quantized_weights_take_their_packed_size(golden_fp32, golden_int8, golden_4bit):
    def layer_bytes(model):
        return module_bytes(model.llm.model.layers) + module_bytes(model.vision.depth.head_transformer)

    full = layer_bytes(golden_fp32)
    # int8: one byte per weight plus one fp32 scale per output channel, against four bytes per weight
    assert 0.25 < layer_bytes(golden_int8) / full < 0.30
    # nf4: half a byte per weight plus block scales (double-quantised), against four bytes, plus about
    # 1.2 KB of code tables per Linear, which weigh on layers this small: measured 0.18 (0.27 for int8)
    assert 0.12 < layer_bytes(golden_4bit) / full < 0.20
    assert golden_int8.weight_bytes() < golden_fp32.weight_bytes()


def test_int8_decisions_stay_close_to_fp32(golden_fp32, golden_int8):
    r = compare(golden_fp32, golden_int8, images=1, answer_tokens=12)
    # measured with dev/bench/quality.py on this model (2 images): 96.3% of codes, KL 0.0016, 32 of 32 answer tokens
    assert r["code_agreement"] > 0.95, r
    assert r["depth_kl"] < 0.02, r
    assert r["answer_agreement"] >= 10 / 12, r


def test_4bit_decisions_stay_near_fp32(golden_fp32, golden_4bit):
    r = compare(golden_fp32, golden_4bit, images=1, answer_tokens=12)
    # NF4 moves most of this random model's near-tied decisions: measured 20.4% of codes, KL 1.99 (bitsandbytes
    # 0.50.2; the same with the weights dequantized into plain Linears, so it is the 4-bit rounding, not a
    # kernel). Chance agreement over 1024 codes is 0.1%, and a KL of log(1024) = 6.9 nats would mean the
    # weights no longer carry the model: the bounds are 100x chance and half that KL.
    assert r["code_agreement"] > 0.1, r
    assert r["depth_kl"] < 3.5, r


def test_int8_composes_with_torch_compile(golden_int8):
    """inductor fuses the dequantisation into the matmul: the same math in another summation order, so
    the logits agree within the rounding bound (tests/conftest.py) and the decisions wherever clear of it."""
    codes = torch.randint(0, 1024, (1, 3, 4), generator=torch.Generator().manual_seed(0))
    depth = golden_int8.vision.depth
    with linear_input_scales(depth.classifier_mlp.linear) as classifier:
        eager = guided_depth_logits(golden_int8, "a cat", codes)  # (B, P, D, V)
    golden_int8.vision.depth = torch.compile(depth, options=cpu_inductor_options())
    try:
        traced = guided_depth_logits(golden_int8, "a cat", codes)
    finally:
        golden_int8.vision.depth = depth
    forward_scales = [s for s in classifier.scales if s.dim() == 3]  # (R, D, V) per position; the steps' are (R, V)
    tolerance = guided_rounding_bound(depth, torch.stack(forward_scales, dim=1), cfg=3.0)  # (B, P, D, V)
    diff = (eager - traced).abs()
    assert (diff <= tolerance).all(), f"logits exceed the rounding bound by {(diff - tolerance).max().item():.3e}"
    top = eager.topk(2, dim=-1).values
    clear = (top[..., 0] - top[..., 1]) > 2 * tolerance.amax(-1)
    assert clear.float().mean() >= 0.5, f"only {clear.float().mean():.2f} of decisions clear of ties"
    assert (eager.argmax(-1) == traced.argmax(-1))[clear].all()


def test_loading_int8_leaves_the_process_wide_inductor_config_and_matmul_precision_unchanged():
    """torchao's default would turn on coordinate-descent tuning, int_mm fusion... for every later compile
    in ComfyUI. The settings it touches are set to their defaults first, so that a load earlier in the
    session cannot hide a change."""
    import torch._inductor.config as inductor

    defaults = dict(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False,
                    force_fuse_int_mm_with_mul=False)
    precision = torch.get_float32_matmul_precision()
    with inductor.patch(**defaults):
        before = inductor.get_config_copy()
        VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu", quantize="int8")
        after = inductor.get_config_copy()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert changed == {}, changed
    assert torch.get_float32_matmul_precision() == precision


def test_unknown_choice_lists_the_choices():
    with pytest.raises(InputError, match=r"unknown quantize choice 'int4'; choose one of: none, int8, 4bit"):
        check_quantize("int4")


def test_missing_library_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(InputError, match=r"quantize '4bit' needs the Python package bitsandbytes.*pip install"):
        VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu", quantize="4-bit")


def test_4bit_keeps_the_layers_the_fused_cpu_kernel_cannot_take(caplog):
    """The golden model's layers (80, 160 and 48 wide) fit none of the fused kernel's tiles: where bitsandbytes
    would take that path they keep the compute dtype, with one log line, instead of failing at the first run."""
    import bitsandbytes as bnb

    with caplog.at_level(logging.WARNING, logger="vilau_backend.memory.weight_quantization"):
        model = load_4bit(GOLDEN_CHECKPOINT, cpu_kernel=True)
    layers = _targeted_linears(model)
    assert len(layers) == 2 * 7 + 2 * 6 + 1  # per LLM layer q k v o gate up down; per depth block q k v proj, 2 mlp; head
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in layers.values()), sorted(layers)
    assert [r.getMessage() for r in caplog.records if r.name == "vilau_backend.memory.weight_quantization"] == [
        "quantize 4bit: 27 of 27 layers keep float32, since bitsandbytes' AVX512-BF16 CPU kernel needs "
        "out_features divisible by 32 and in_features by 64 (e.g. model.layers.0.self_attn.q_proj)"
    ]
    codes = guided_depth_logits(model, "a cat", torch.zeros(1, 2, 4, dtype=torch.long))
    assert torch.isfinite(codes).all()


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["fused-cpu-kernel", "dequantize-path"])
def test_4bit_quantizes_every_layer_whose_shape_fits_on_either_cpu_path(checkpoint_64, cpu_kernel, caplog):
    import bitsandbytes as bnb

    with caplog.at_level(logging.WARNING, logger="vilau_backend.memory.weight_quantization"):
        model = load_4bit(checkpoint_64, cpu_kernel=cpu_kernel)
    layers = _targeted_linears(model)
    assert len(layers) == 27
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in layers.values()), [n for n, m in layers.items()
                                                                           if not isinstance(m, bnb.nn.Linear4bit)]
    assert [r for r in caplog.records if r.name == "vilau_backend.memory.weight_quantization"] == []


def test_4bit_on_this_cpus_own_path_agrees_with_the_dequantize_path(checkpoint_64):
    """Whichever path this CPU takes (the fused kernel computes in bf16, the other in the compute dtype),
    the same 4-bit weights must make mostly the same decisions: a wrong repacking would leave chance
    agreement (1 in 256 codes)."""
    own, generic = load_4bit(checkpoint_64), load_4bit(checkpoint_64, cpu_kernel=False)
    r = compare(generic, own, images=1, answer_tokens=8)
    assert r["code_agreement"] > 0.5, r
    assert r["answer_agreement"] >= 0.5, r


def test_weights_are_measured_without_state_dict(golden_4bit, monkeypatch):
    """state_dict() of a 4-bit layer repacked for bitsandbytes' fused CPU kernel unpacks its weight, which
    broke layers streamed from CPU memory on CPUs that take that path: sizes come from the tensors."""
    networks = golden_4bit.networks
    expected = sum(tensor_bytes(t) for t in networks.state_dict().values()) + sum(  # + what state_dict leaves out
        tensor_bytes(b) for m in networks.modules() for n, b in m._buffers.items() if n in m._non_persistent_buffers_set)

    def refuse(*args, **kwargs):
        raise AssertionError("module_bytes called state_dict()")

    monkeypatch.setattr(torch.nn.Module, "state_dict", refuse)
    assert module_bytes(networks) == expected
