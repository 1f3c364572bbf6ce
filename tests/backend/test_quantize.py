"""quantize='int8' / '4bit': which weights are quantized, how much memory they take, and how far decisions move.

Tolerances are measured on the golden checkpoint (dev/bench/quality.py prints the same
figures; README.md has them for larger models): a random-weight tiny model has
near-uniform depth distributions, so many decisions are near-ties and agreement is
lower than on a trained model; the bounds leave room for other CPUs' kernels.
"""

from __future__ import annotations

import builtins

import pytest
import torch

from dev.bench.quality import compare, guided_depth_logits
from conftest import GOLDEN_CHECKPOINT
from vilau_backend.errors import InputError
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.memory.weight_quantization import check_quantize, module_bytes


@pytest.fixture(scope="module")
def golden_int8():
    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu", quantize="int8")


@pytest.fixture(scope="module")
def golden_4bit():
    return VilaUModel.load(GOLDEN_CHECKPOINT, dtype="float32", device="cpu", quantize="4bit")


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
    # 4-bit moves many of this random model's near-tied decisions; chance agreement over 1024 codes
    # is 0.1%: half the decisions kept means the weights still carry the model
    assert r["code_agreement"] > 0.5, r
    assert r["depth_kl"] < 1.0, r


def test_int8_composes_with_torch_compile(golden_int8):
    codes = torch.randint(0, 1024, (1, 3, 4), generator=torch.Generator().manual_seed(0))
    eager = guided_depth_logits(golden_int8, "a cat", codes)
    depth = golden_int8.vision.depth
    compiled = torch.compile(depth)
    golden_int8.vision.depth = compiled
    try:
        traced = guided_depth_logits(golden_int8, "a cat", codes)
    finally:
        golden_int8.vision.depth = depth
    # inductor fuses the dequantisation into the matmul: same math, another summation order
    assert torch.allclose(eager, traced, atol=1e-3, rtol=1e-4), (eager - traced).abs().max()


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
