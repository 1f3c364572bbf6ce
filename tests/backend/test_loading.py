"""Loading checkpoints in the published layout, and the errors for broken ones."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN_CHECKPOINT
from vilau_backend.checkpoint.config import KNOWN_SIGLIP_VISION_CONFIGS, is_vila_u_folder, load_config
from vilau_backend.errors import CheckpointError
from vilau_backend.model.vila_u import VilaUModel
from vilau_backend.testing.random_checkpoint import CheckpointSizes, write_random_checkpoint


@pytest.fixture
def broken(tmp_path, small_checkpoint) -> Path:
    """A writable copy of the small random checkpoint to damage."""
    return Path(shutil.copytree(small_checkpoint, tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_golden_checkpoint_loads_with_configured_geometry(golden_fp32):
    cfg = golden_fp32.config
    assert cfg.image_size == 256 and cfg.grid == (16, 16) and cfg.quantizer.depth == 4
    assert cfg.quantizer.n_embed == 1024 and cfg.quantizer.shared_codebook
    assert cfg.projector.kind == "mlp2x_gelu" and cfg.num_video_frames == 8
    assert len(golden_fp32.tokenizer) == cfg.llm.vocab_size == 1004
    assert golden_fp32.tokenizer.token_id("<im_start>") == 1000 and golden_fp32.tokenizer.token_id("<vi_start>") == 1002


def test_siglip_is_built_without_its_last_layer_head_or_text_tower(golden_fp32):
    names = [n for n, _ in golden_fp32.vision.named_parameters()]
    assert not any("text_model" in n or "post_layernorm" in n or ".head." in n for n in names)
    assert len(golden_fp32.vision.siglip.encoder.layers) == golden_fp32.config.siglip.num_hidden_layers - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_weight_has_the_requested_dtype(small_checkpoint, dtype):
    model = VilaUModel.load(small_checkpoint, dtype=dtype, device="cpu")
    for module in (model.llm, model.vision, model.projector):
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == {dtype}, (type(module).__name__, dtypes)


def test_root_model_type_vila_u_is_accepted(broken):
    edit_json(broken / "config.json", model_type="vila_u")
    assert load_config(broken).quantizer.depth == 4
    assert is_vila_u_folder(broken)


def test_sharded_llm_loads_same_weights_as_single_file(tmp_path):
    single = VilaUModel.load(write_random_checkpoint(tmp_path / "single", seed=3), dtype="float32")
    sharded_dir = write_random_checkpoint(tmp_path / "sharded", seed=3, shard_llm=True)
    assert (sharded_dir / "llm" / "model.safetensors.index.json").is_file()
    assert not (sharded_dir / "llm" / "model.safetensors").exists()
    sharded = VilaUModel.load(sharded_dir, dtype="float32")
    for (name, a), (_, b) in zip(single.llm.state_dict().items(), sharded.llm.state_dict().items()):
        assert torch.equal(a, b), name


def test_per_depth_codebooks_are_read(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m", CheckpointSizes(shared_codebook=False))
    model = VilaUModel.load(folder, dtype="float32")
    books = [model.vision.quantizer.codebook(d).weight for d in range(4)]
    assert not torch.equal(books[0], books[1])
    stored = load_file(str(folder / "vision_tower" / "model.safetensors"))
    assert torch.equal(books[2], stored["rqvaesiglip.quantizer.codebooks.2.weight"].float())


@pytest.mark.parametrize("hub_id, grid, width", [
    ("google/siglip-large-patch16-256", 16, 1024),
    ("google/siglip-so400m-patch14-384", 27, 1152),
])
def test_published_siglip_hub_ids_resolve_without_network(broken, hub_id, grid, width):
    shutil.rmtree(broken / "vision_tower" / "siglip")
    vt = broken / "vision_tower" / "config.json"
    data = json.loads(vt.read_text())
    rq = data["rqvaesiglip"]
    rq.update(pretrained_model=hub_id, embed_dim=width, code_shape=[grid, grid, 4], latent_shape=[grid, grid, width])
    vt.write_text(json.dumps(data))
    cfg = load_config(broken)
    assert cfg.siglip.source == hub_id
    assert cfg.grid == (grid, grid) and cfg.tokens_per_image == grid * grid
    assert cfg.siglip.hidden_size == width == KNOWN_SIGLIP_VISION_CONFIGS[hub_id]["hidden_size"]


def test_siglip_given_as_absolute_folder(broken, tmp_path):
    moved = Path(shutil.move(str(broken / "vision_tower" / "siglip"), str(tmp_path / "elsewhere")))
    vt = broken / "vision_tower" / "config.json"
    data = json.loads(vt.read_text())
    data["rqvaesiglip"]["pretrained_model"] = str(moved)
    vt.write_text(json.dumps(data))
    assert load_config(broken).siglip.source == str(moved)


def test_unknown_siglip_says_what_to_provide(broken):
    shutil.rmtree(broken / "vision_tower" / "siglip")
    with pytest.raises(CheckpointError, match=r"names SigLIP 'siglip'.*neither a known SigLIP.*config.json"):
        load_config(broken)


def test_missing_model_folder_says_what_a_model_folder_holds():
    with pytest.raises(CheckpointError, match=r"model folder /nonexistent/vila does not exist.*llm/, vision_tower/"):
        VilaUModel.load("/nonexistent/vila")


def test_missing_subfolder_is_named(broken):
    shutil.rmtree(broken / "mm_projector")
    with pytest.raises(CheckpointError, match=r"has no mm_projector/ sub-folder"):
        VilaUModel.load(broken)


def test_missing_weight_file_is_named(broken):
    (broken / "vision_tower" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vision_tower has neither model.safetensors nor model.safetensors.index.json"):
        VilaUModel.load(broken)


def test_missing_shard_listed_in_the_index_says_to_download(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m", shard_llm=True)
    (folder / "llm" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors is missing.*download"):
        VilaUModel.load(folder)


def test_wrong_model_type_names_the_file(broken):
    edit_json(broken / "config.json", model_type="llava_llama")
    with pytest.raises(CheckpointError, match=r"config.json has model_type 'llava_llama'; a VILA-U checkpoint says 'vila_u_llama'"):
        VilaUModel.load(broken)


def test_truncated_safetensors_names_the_file(broken):
    path = broken / "mm_projector" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mm_projector/model.safetensors is truncated or corrupt.*download"):
        VilaUModel.load(broken)


def test_corrupt_safetensors_header_names_the_file(broken):
    path = broken / "llm" / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"llm/model.safetensors is truncated or corrupt"):
        VilaUModel.load(broken)


def test_missing_tensor_is_named(broken):
    path = broken / "vision_tower" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["rqtransformer.pos_emb_d"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"vision_tower lacks 1 tensor\(s\) the model needs: rqtransformer.pos_emb_d"):
        VilaUModel.load(broken)


def test_wrong_shape_is_named(broken):
    path = broken / "mm_projector" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layers.0.weight"] = torch.zeros(3, 5, dtype=torch.bfloat16)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.weight' in .*mm_projector/model.safetensors has shape \[3, 5\], expected \[64, 64\]"):
        VilaUModel.load(broken)


def test_tokenizer_without_the_vila_u_tokens_is_a_checkpoint_error(broken):
    (broken / "llm" / "added_tokens.json").unlink()
    cfg = json.loads((broken / "llm" / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < 3}
    cfg["additional_special_tokens"] = []
    (broken / "llm" / "tokenizer_config.json").write_text(json.dumps(cfg))
    special = json.loads((broken / "llm" / "special_tokens_map.json").read_text())
    special["additional_special_tokens"] = []
    (broken / "llm" / "special_tokens_map.json").write_text(json.dumps(special))
    with pytest.raises(CheckpointError, match=r"lacks the VILA-U tokens <im_start>"):
        VilaUModel.load(broken)


def test_unsupported_aspect_ratio_is_a_checkpoint_error(broken):
    edit_json(broken / "config.json", image_aspect_ratio="square")
    with pytest.raises(CheckpointError, match=r"image_aspect_ratio 'square' is not supported"):
        load_config(broken)


@pytest.mark.parametrize(
    "section, path, key",
    [
        ("rqvaesiglip", ["ddconfig", "ch"], "rqvaesiglip.ddconfig.ch"),
        ("rqvaesiglip", ["ddconfig"], "rqvaesiglip.ddconfig.ch"),
        ("rqvaesiglip", ["code_shape"], "rqvaesiglip.code_shape"),
        ("rqtransformer", ["head", "block", "n_head"], "rqtransformer.head.block.n_head"),
        ("rqtransformer", ["head", "n_layer"], "rqtransformer.head.n_layer"),
    ],
)
def test_missing_nested_vision_tower_key_names_the_file_and_the_key(broken, section, path, key):
    vt = broken / "vision_tower" / "config.json"
    data = json.loads(vt.read_text())
    parent = data[section]
    for name in path[:-1]:
        parent = parent[name]
    del parent[path[-1]]
    vt.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"vision_tower/config.json has no '{re.escape(key)}' entry"):
        load_config(broken)


@pytest.mark.parametrize("kind, depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_kind_is_parsed_into_its_depth(broken, kind, depth):
    edit_json(broken / "mm_projector" / "config.json", mm_projector_type=kind)
    spec = load_config(broken).projector
    assert (spec.kind, spec.mlp_depth) == (kind, depth)


def test_unknown_projector_kind_names_the_file(broken):
    edit_json(broken / "mm_projector" / "config.json", mm_projector_type="mlp2x_relu")
    with pytest.raises(CheckpointError, match=r"mm_projector/config.json: unsupported mm_projector_type 'mlp2x_relu'"):
        load_config(broken)


def test_golden_layout_is_recognised_as_a_model_folder():
    assert is_vila_u_folder(GOLDEN_CHECKPOINT)
    assert not is_vila_u_folder(GOLDEN_CHECKPOINT / "llm")


def test_decoder_latent_shape_resizes_codes_before_decoding(broken):
    """The original resizes the code grid bilinearly (in float32) to decoder_latent_shape first."""
    vt = broken / "vision_tower" / "config.json"
    data = json.loads(vt.read_text())
    data["rqvaesiglip"]["decoder_latent_shape"] = [16, 16]
    data["rqvaesiglip"]["ddconfig"]["resolution"] = 128  # 4 levels: 16 -> 128 px
    vt.write_text(json.dumps(data))
    model = VilaUModel.load(broken, dtype="float32")
    codes = torch.randint(0, 256, (1, 8, 8, 4))
    features = model.codes_to_features(codes)  # (1, 8, 8, C)
    images = model.decode_features(features)
    assert images.shape == (1, 128, 128, 3)
    resized = torch.nn.functional.interpolate(features.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        raw = model.vision.pixel_decoder.decoder(model.vision.pixel_decoder.post_quant_conv(resized))
    expected = raw.add(1).mul(127.5).clamp(0, 255).div(255).permute(0, 2, 3, 1)
    assert (images - expected).abs().max().item() < 1e-4  # float32 conv rounding only
