"""Write a random-weight VILA-U checkpoint in exactly the published layout: small, or full size.

For tests and for a demo without the 7B weights (`CheckpointSizes()`, whose defaults are small:
64 px, an 8x8 grid, depth 4; not the golden checkpoint that tests/fixtures holds, which was
recorded from the original implementation), and for
measuring loading at the real size (`FULL_7B_256`: a 7B-shaped LLM in bf16
shards, SigLIP-large, the original's depth transformer and decoder defaults),
written shard by shard so that writing never holds more than one shard. Every file the published
models have is written, in the format transformers 4.36 wrote them (the
version the original saved with): root config.json with model_type
"vila_u_llama"; llm/ with config.json, generation_config.json, safetensors and
a sentencepiece tokenizer carrying the VILA-U added tokens; vision_tower/ with
the SigLIP (full, text tower included, as the original stores it), the
quantizer with its EMA buffers, the decoder and the depth transformer;
mm_projector/. At small sizes SigLIP's config lives in a local folder because no
public SigLIP is this small; the full size names the published SigLIP by hub id.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.tokenizer import VILA_U_TOKENS
from ..decoding.prompts import SYSTEM_PROMPT

SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class CheckpointSizes:
    image_size: int = 64
    patch_size: int = 8
    siglip_width: int = 64
    siglip_layers: int = 3  # VILA-U runs all but the last
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    sp_vocab: int = 512
    depth: int = 4
    n_embed: int = 256
    depth_width: int = 32
    depth_layers: int = 2
    decoder_ch: int = 32
    shared_codebook: bool = True
    projector: str = "mlp2x_gelu"
    image_aspect_ratio: str = "resize"
    num_video_frames: int = 4
    # the defaults below keep the small geometry; FULL_7B_256 sets them to real sizes
    llm_intermediate: int | None = None  # None: 2 * llm_hidden
    llm_shards: int = 1  # 1: llm/model.safetensors; more: model-0000i-of-0000n.safetensors + index
    siglip_heads: int = 4
    siglip_intermediate: int | None = None  # None: 2 * siglip_width
    siglip_hub_id: str | None = None  # None: the config in vision_tower/siglip/
    siglip_text: tuple[int, int, int, int] = (32, 1, 64, 64)  # text tower: width, layers, vocab, positions
    depth_heads: int = 4
    decoder_ch_mult: tuple[int, ...] | None = None  # None: all 1, as many levels as the upsampling needs
    decoder_res_blocks: int = 1
    decoder_z_channels: int = 32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# A 7B-shaped 256 px model: LLaMA-2-7B (4096 x 32, MLP 11008, 32000 + 4 tokens) in 8 bf16 shards,
# SigLIP-large-patch16-256 (vision and text towers), 16384 codes of depth 4; the depth transformer
# (2560 x 6, 40 heads) and decoder follow the original code's defaults (as dev/bench/generate.py's `full`).
FULL_7B_256 = CheckpointSizes(
    image_size=256, patch_size=16, siglip_width=1024, siglip_layers=24, siglip_heads=16, siglip_intermediate=4096,
    siglip_hub_id="google/siglip-large-patch16-256", siglip_text=(1024, 24, 32000, 64),
    llm_hidden=4096, llm_layers=32, llm_heads=32, llm_intermediate=11008, sp_vocab=32000, llm_shards=8,
    depth=4, n_embed=16384, depth_width=2560, depth_layers=6, depth_heads=40,
    decoder_ch=128, decoder_ch_mult=(1, 1, 2, 2, 4), decoder_res_blocks=2, decoder_z_channels=256,
    num_video_frames=8,
)


def write_random_checkpoint(folder: str | Path, sizes: CheckpointSizes = CheckpointSizes(), seed: int = 0, shard_llm: bool = False) -> Path:
    """Write the checkpoint into `folder` (created) and return it. `shard_llm`: two LLM shards
    (whatever `sizes.llm_shards` says)."""
    folder = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    (folder / "llm").mkdir(parents=True, exist_ok=True)
    (folder / "vision_tower").mkdir(parents=True, exist_ok=True)
    (folder / "mm_projector").mkdir(parents=True, exist_ok=True)

    n_words = write_tokenizer(folder / "llm", sizes.sp_vocab)
    vocab = n_words + len(VILA_U_TOKENS)
    llm_cfg = _llm_config(sizes, vocab)
    vt_cfg = _vision_tower_config(sizes)
    proj_cfg = {
        "_name_or_path": "mm_projector",
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": sizes.projector,
        "model_type": "v2l_projector",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }
    _dump(folder / "llm" / "config.json", llm_cfg)
    _dump(
        folder / "llm" / "generation_config.json",
        {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
         "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.36.2"},
    )
    _dump(folder / "vision_tower" / "config.json", vt_cfg)
    if sizes.siglip_hub_id is None:
        (folder / "vision_tower" / "siglip").mkdir(exist_ok=True)
        _dump(folder / "vision_tower" / "siglip" / "config.json", _siglip_config(sizes))
    _dump(
        folder / "vision_tower" / "preprocessor_config.json",
        {"crop_size": {"height": sizes.image_size, "width": sizes.image_size}, "do_center_crop": True,
         "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "CLIPImageProcessor", "image_std": [0.5, 0.5, 0.5],
         "resample": 3, "rescale_factor": 1 / 255, "size": {"height": sizes.image_size, "width": sizes.image_size}},
    )
    _dump(folder / "mm_projector" / "config.json", proj_cfg)
    _dump(folder / "config.json", _root_config(sizes, llm_cfg, vt_cfg, proj_cfg))

    _write_llm_weights(folder / "llm", sizes, vocab, gen, 2 if shard_llm else sizes.llm_shards)
    save_file(_vision_tower_weights(sizes, gen), str(folder / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
    save_file(_projector_weights(sizes, gen), str(folder / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ---- configs ------------------------------------------------------------------------


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _llm_config(s: CheckpointSizes, vocab: int) -> dict:
    return {
        "_name_or_path": "llm",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": s.llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.llm_intermediate or 2 * s.llm_hidden,
        "max_position_embeddings": 4096,
        "model_max_length": 8192,
        "model_type": "llama",
        "num_attention_heads": s.llm_heads,
        "num_hidden_layers": s.llm_layers,
        "num_key_value_heads": s.llm_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 2.0, "type": "linear"},
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 8192,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
        "use_cache": True,
        "vocab_size": vocab,
    }


def _siglip_config(s: CheckpointSizes) -> dict:
    text_width, text_layers, text_vocab, text_positions = s.siglip_text
    return {
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "text_config": {"model_type": "siglip_text_model", "hidden_size": text_width, "intermediate_size": 4 * text_width,
                        "num_hidden_layers": text_layers, "num_attention_heads": max(2, text_width // 64),
                        "vocab_size": text_vocab, "max_position_embeddings": text_positions,
                        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                        "pad_token_id": 1, "bos_token_id": 62, "eos_token_id": 63, "attention_dropout": 0.0},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": s.siglip_width,
                          "intermediate_size": s.siglip_intermediate or 2 * s.siglip_width,
                          "num_hidden_layers": s.siglip_layers, "num_attention_heads": s.siglip_heads, "image_size": s.image_size, "patch_size": s.patch_size,
                          "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                          "attention_dropout": 0.0},
    }


def _ddconfig(s: CheckpointSizes) -> dict:
    levels = 1
    while s.grid * 2 ** (levels - 1) < s.image_size:
        levels += 1
    ch_mult = list(s.decoder_ch_mult) if s.decoder_ch_mult else [1] * levels
    return {"double_z": False, "z_channels": s.decoder_z_channels, "resolution": s.image_size, "in_channels": 3,
            "out_ch": 3, "ch": s.decoder_ch, "ch_mult": ch_mult, "num_res_blocks": s.decoder_res_blocks,
            "attn_resolutions": [s.grid], "dropout": 0.0}


def _vision_tower_config(s: CheckpointSizes) -> dict:
    return {
        "_name_or_path": "vision_tower",
        "architectures": ["RQVAESIGLIPTransformer"],
        "hidden_size": s.siglip_width,
        "model_type": "rqvaesigliptransformer_model",
        "rqtransformer": {
            "architectures": ["RQTransformer"],
            "attn_implementation": None,
            "block_size": [s.grid, s.grid, s.depth],
            "embed_dim": s.depth_width,
            "head": {"block": {"n_head": s.depth_heads}, "n_layer": s.depth_layers},
            "input_embed_dim_1": s.siglip_width,
            "input_embed_dim_2": s.llm_hidden,
            "vocab_size": s.n_embed,
        },
        "rqvaesiglip": {
            "architectures": ["RQVAESiglipModel"],
            "attn_implementation": None,
            "code_shape": [s.grid, s.grid, s.depth],
            "ddconfig": _ddconfig(s),
            "decay": 0.99,
            "decoder_latent_shape": None,
            "embed_dim": s.siglip_width,
            "latent_loss_weight": 0.25,
            "latent_shape": [s.grid, s.grid, s.siglip_width],
            "n_embed": s.n_embed,
            "pretrained_model": s.siglip_hub_id or "siglip",
            "restart_unused_codes": True,
            "shared_codebook": s.shared_codebook,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }


def _root_config(s: CheckpointSizes, llm_cfg: dict, vt_cfg: dict, proj_cfg: dict) -> dict:
    return {
        "_name_or_path": "vila-u-small",
        "architectures": ["VILAULlamaModel"],
        "drop_path_rate": 0.0,
        "hidden_size": s.llm_hidden,
        "image_aspect_ratio": s.image_aspect_ratio,
        "interpolate_mode": "linear",
        "llm_cfg": llm_cfg,
        "mm_hidden_size": s.siglip_width,
        "mm_projector_cfg": proj_cfg,
        "mm_projector_lr": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_use_vi_start_end": True,
        "mm_vision_select_layer": -2,
        "model_dtype": "torch.bfloat16",
        "model_type": "vila_u_llama",
        "num_video_frames": s.num_video_frames,
        "resume_path": "vila-u-small",
        "transformers_version": "4.36.2",
        "tune_language_model": True,
        "tune_mm_projector": True,
        "tune_vision_tower": False,
        "vision_tower_cfg": vt_cfg,
    }


# ---- tokenizer ----------------------------------------------------------------------


def write_tokenizer(llm_dir: Path, vocab_size: int) -> int:
    """Train a small Llama-style sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback).

    Past 512 pieces the small corpus has nothing more to learn: the vocabulary is filled up
    to `vocab_size` with placeholder symbols (so that a full-size model has Llama's 32000)."""
    import sentencepiece as spm

    learned = min(vocab_size, 512)
    fillers = [f"<filler_{i}>" for i in range(vocab_size - learned)]
    corpus = [SYSTEM_PROMPT, "USER: ASSISTANT: describe the image in detail. what is in this video?",
              "a red apple on a table. fireworks in the air. a cat sitting on a sofa. a cup of coffee.",
              "The quick brown fox jumps over the lazy dog. 0123456789 .,;:!?'\"()[]{}<>-_/"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20),
        model_writer=model,
        vocab_size=learned + len(fillers),
        user_defined_symbols=fillers,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (llm_dir / "tokenizer.model").write_bytes(model.getvalue())
    n_words = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    added = {tok: n_words + i for i, tok in enumerate(VILA_U_TOKENS)}
    _dump(llm_dir / "added_tokens.json", added)
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _dump(llm_dir / "special_tokens_map.json", {
        "additional_special_tokens": [dict(special, content=t) for t in VILA_U_TOKENS],
        "bos_token": dict(special, content="<s>"),
        "eos_token": dict(special, content="</s>"),
        "pad_token": "<unk>",
        "unk_token": dict(special, content="<unk>"),
    })
    decoder = {str(i): dict(special, content=c, special=True) for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))}
    decoder.update({str(i): dict(special, content=t, special=True) for t, i in added.items()})
    _dump(llm_dir / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(VILA_U_TOKENS), "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": False, "model_max_length": 8192, "pad_token": "<unk>",
        "padding_side": "right", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    })
    return n_words


# ---- weights ------------------------------------------------------------------------


def _normal(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)


def _init_like(state: dict[str, torch.Tensor], gen: torch.Generator, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random weights for a state dict: matrices N(0, 1/sqrt(fan_in)), norms near 1, biases small."""
    out = {}
    for name, t in state.items():
        shape = tuple(t.shape)
        leaf = name.rsplit(".", 1)[-1]
        if not t.is_floating_point():
            out[prefix + name] = t.clone()
        elif len(shape) >= 2 and leaf == "weight":
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            out[prefix + name] = _normal(gen, *shape, std=fan_in**-0.5)
        elif leaf == "weight" and ("norm" in name or "ln" in name):
            out[prefix + name] = (1 + _normal(gen, *shape, std=0.1).float()).to(torch.bfloat16)
        else:
            out[prefix + name] = _normal(gen, *shape, std=0.02)
    return out


def _write_llm_weights(folder: Path, s: CheckpointSizes, vocab: int, gen: torch.Generator, n_shards: int) -> None:
    """Random Llama weights, one shard at a time.

    Any sharding gives the same values: tensors are drawn in state-dict order, and the unit-scale
    token embeddings are redrawn after all of them (so, sharded, they go into the last shard)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=s.llm_hidden, intermediate_size=s.llm_intermediate or 2 * s.llm_hidden,
                      num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads,
                      num_key_value_heads=s.llm_heads, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = LlamaForCausalLM(cfg).state_dict()
    if n_shards == 1:
        weights = _init_like(shapes, gen)
        weights[EMBED_KEY] = _unit_embeddings(shapes, gen)
        save_file(weights, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    names = list(shapes)
    total = sum(t.numel() * 2 for t in shapes.values())  # bf16
    weight_map, start = {}, 0
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        stop, size = start, 0
        while stop < len(names) and (size < total / n_shards or i == n_shards - 1):
            size += shapes[names[stop]].numel() * 2
            stop += 1
        part = _init_like({k: shapes[k] for k in names[start:stop]}, gen)
        part.pop(EMBED_KEY, None)  # drawn only to keep the stream of values as unsharded
        if i == n_shards - 1:
            part[EMBED_KEY] = _unit_embeddings(shapes, gen)
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        del part
        start = stop
    _dump(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


EMBED_KEY = "model.embed_tokens.weight"


def _unit_embeddings(shapes: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Token embeddings of unit scale, as trained Llamas have."""
    return _normal(gen, *shapes[EMBED_KEY].shape, std=1.0)


def _vision_tower_weights(s: CheckpointSizes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    from transformers import SiglipConfig, SiglipModel

    from ..checkpoint.config import DecoderSpec, DepthSpec
    from ..model.pixel_decoder import PixelDecoder
    from ..model.depth import DepthTransformer

    parts = _siglip_config(s)
    siglip_cfg = SiglipConfig(text_config=parts["text_config"], vision_config=parts["vision_config"])
    with torch.device("meta"):
        siglip = SiglipModel(siglip_cfg).state_dict()
    weights = _init_like(siglip, gen, "rqvaesiglip.siglip_model.")
    # as save_pretrained wrote it: SigLIP's logit scale and bias only under rqvaesiglip.*
    weights.pop("rqvaesiglip.siglip_model.logit_scale", None)
    weights.pop("rqvaesiglip.siglip_model.logit_bias", None)
    weights["rqvaesiglip.logit_scale"] = torch.tensor([2.3026], dtype=torch.bfloat16)
    weights["rqvaesiglip.logit_bias"] = torch.tensor([-10.0], dtype=torch.bfloat16)
    weights["rqvaesiglip.siglip_model.vision_model.embeddings.position_embedding.weight"] = _normal(
        gen, s.grid * s.grid, s.siglip_width, std=0.5)

    dd = _ddconfig(s)
    dec_spec = DecoderSpec(ch=dd["ch"], out_ch=3, ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                           attn_resolutions=tuple(dd["attn_resolutions"]), resolution=dd["resolution"],
                           z_channels=dd["z_channels"], latent_shape=None)
    with torch.device("meta"):
        decoder = PixelDecoder(dec_spec, code_dim=s.siglip_width).state_dict()
    weights.update(_init_like(decoder, gen, "rqvaesiglip."))

    # codebooks scaled like the SigLIP features so that nearest-code search uses many codes
    for d in range(1 if s.shared_codebook else s.depth):
        book = _normal(gen, s.n_embed, s.siglip_width, std=1.0 / (d + 1))
        weights[f"rqvaesiglip.quantizer.codebooks.{d}.weight"] = torch.cat(
            [book, torch.zeros(1, s.siglip_width, dtype=torch.bfloat16)])  # + the padding row
        weights[f"rqvaesiglip.quantizer.codebooks.{d}.embed_ema"] = book.clone()
        weights[f"rqvaesiglip.quantizer.codebooks.{d}.cluster_size_ema"] = torch.ones(s.n_embed, dtype=torch.bfloat16)

    depth_spec = DepthSpec(embed_dim=s.depth_width, n_layer=s.depth_layers, n_head=4, vocab_size=s.n_embed,
                           depth=s.depth, code_dim=s.siglip_width, llm_dim=s.llm_hidden)
    with torch.device("meta"):
        depth = DepthTransformer(depth_spec).state_dict()
    weights.update(_init_like(depth, gen, "rqtransformer."))
    weights["rqtransformer.pos_emb_d"] = _normal(gen, 1, s.depth, s.depth_width, std=0.5)
    return {k: v.contiguous() for k, v in weights.items()}


def _projector_weights(s: CheckpointSizes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    from ..checkpoint.config import ProjectorSpec
    from ..model.projector import Projector

    with torch.device("meta"):
        state = Projector(ProjectorSpec(kind=s.projector, in_dim=s.siglip_width, out_dim=s.llm_hidden)).state_dict()
    return _init_like(state, gen)
