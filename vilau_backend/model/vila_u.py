"""The loaded VILA-U model: LLM, tokenizer, vision tower and projector, in one compute dtype (weights
optionally int8/4-bit, layers optionally placed over several devices or streamed from CPU memory).

`VilaUModel.load(folder, dtype=..., device=..., quantize=...)` reads the published layout; the
methods here are the vision API (encode images to codes, decode codes or summed
features to images). Understanding and generation live in their own modules
and take a VilaUModel.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.config import VilaUConfig, load_config
from .pixel_decoder import PixelDecoder
from .depth import DepthTransformer
from ..errors import CheckpointError, InputError
from ..checkpoint.loading import SafetensorsFolder, build_empty, load_weights
from ..media.preprocess import preprocess_images, to_comfy_images
from .projector import Projector
from ..memory.weight_quantization import (
    DEPTH_TARGETS,
    LLM_TARGETS,
    LinearConverter,
    check_quantize,
    log_kept_layers,
    module_bytes,
    open_quantized_cache,
)
from ..memory.quantized_cache import CacheCorrupt, QuantizedCache
from ..memory.working_memory import held_bytes
from ..checkpoint.tokenizer import VilaTokenizer
from .rq_codebook import ResidualQuantizer
from .siglip import SiglipFeatureEncoder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto' -> bfloat16 on a GPU, float32 elsewhere (bf16 convolutions are slow on CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


@dataclass
class EncodedImages:
    codes: torch.Tensor  # (B, h, w, D) int64
    z_q: torch.Tensor  # (B, h, w, C) quantized features, model dtype
    features: torch.Tensor  # (B, h, w, C) summed code embeddings, what the decoder takes


class VisionTower(nn.Module):
    """SigLIP encoder + residual quantizer + pixel decoder + depth transformer.

    Module names follow `vision_tower/model.safetensors`: `rqvaesiglip.siglip_model.vision_model.*`,
    `rqvaesiglip.quantizer.*`, `rqvaesiglip.post_quant_conv.*`, `rqvaesiglip.decoder.*`, `rqtransformer.*`."""

    def __init__(self, config: VilaUConfig):
        super().__init__()
        self.siglip = SiglipFeatureEncoder(config.siglip)
        self.quantizer = ResidualQuantizer(config.quantizer)
        self.pixel_decoder = PixelDecoder(config.decoder, code_dim=config.quantizer.embed_dim)
        self.depth = DepthTransformer(config.depth)

    def load(self, folder: Path, dtype: torch.dtype, device: torch.device, convert: LinearConverter) -> None:
        """The weights from vision_tower/; `convert` quantizes the depth transformer only."""
        with SafetensorsFolder(folder) as weights:
            load_weights(self.siglip, weights, "rqvaesiglip.siglip_model.vision_model.", dtype, device)
            load_weights(self.quantizer, weights, "rqvaesiglip.quantizer.", dtype, device)
            load_weights(self.pixel_decoder, weights, "rqvaesiglip.", dtype, device)
            load_weights(self.depth, weights, "rqtransformer.", dtype, device, convert=convert)


class VilaUModel:
    def __init__(
        self,
        config: VilaUConfig,
        tokenizer: VilaTokenizer,
        llm: nn.Module,
        vision: VisionTower,
        projector: Projector,
        dtype: torch.dtype,
        quantize: str = "none",
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.llm = llm
        self.vision = vision
        self.projector = projector
        self.dtype = dtype  # the compute dtype (and that of every weight not quantized)
        self.weight_quantization = quantize  # 'none', 'int8' or '4bit': the LLM's and depth transformer's Linears
        # every weight in one plain module, for callers that move or measure the model as a whole
        # (ComfyUI's ModelPatcher cannot wrap a transformers model directly)
        self.networks = nn.ModuleDict({"llm": llm, "vision": vision, "projector": projector})
        # the compiled step's KV cache and buffers, kept for the next run of the same size
        self.step_states: dict = {}
        # make_room(bytes) -> bytes free after the host freed memory for a run (memory/working_memory.py);
        # None: the free memory of the device as torch sees it. ComfyUI's nodes set it.
        self.make_room = None
        # why this model's compiled steps were turned off after a failure (decoding/compile_choice.py); None: on
        self.compile_failure: str | None = None

    @classmethod
    def load(
        cls,
        folder: str | Path,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        quantize: str | None = "none",
        run_device: str | torch.device | None = None,
        quantized_cache: str | os.PathLike | None = "auto",
    ) -> VilaUModel:
        """Read a model folder. `quantize` ('none', 'int8', '4bit') stores the LLM's decoder layers and the
        depth transformer weight-only quantized (vilau_backend/memory/weight_quantization.py), layer by layer
        as they are read. `run_device`: where the model will run, when `device` is only where its weights
        rest until then (ComfyUI's offload device): layers are quantized there. `quantized_cache`: the folder
        that keeps quantized layers for the next load of the same choice ('auto': ~/.cache/vila-u/quantized;
        None: none; vilau_backend/memory/quantized_cache.py)."""
        scheme = check_quantize(quantize)
        config = load_config(folder)
        device = resolve_device(device)
        run_device = device if run_device is None else resolve_device(run_device)
        dtype = resolve_dtype(dtype, run_device)
        tokenizer = VilaTokenizer(config.llm_dir, add_im_patch_token=config.mm_use_im_patch_token)
        _check_tokenizer_matches(config, tokenizer)
        cache = open_quantized_cache(quantized_cache, Path(folder), [config.llm_dir, config.vision_tower_dir],
                                     scheme, dtype, run_device)
        try:
            try:
                return cls._read(config, tokenizer, scheme, dtype, device, run_device, cache)
            except CacheCorrupt as error:
                log.warning("VILA-U: the quantized copy failed its checks (%s); quantizing again and rewriting it", error)
                cache.discard()
                return cls._read(config, tokenizer, scheme, dtype, device, run_device, cache)
        finally:
            if cache is not None:
                cache.close()

    @classmethod
    def _read(cls, config: VilaUConfig, tokenizer: VilaTokenizer, scheme: str, dtype: torch.dtype,
              device: torch.device, run_device: torch.device, cache: QuantizedCache | None) -> VilaUModel:
        """The networks from the checkpoint (and the quantized layers from `cache` when it holds them)."""
        llm = build_empty(lambda: _build_llm(config))
        llm_convert = LinearConverter(scheme, LLM_TARGETS, dtype, run_device, cache, part="llm")
        with SafetensorsFolder(config.llm_dir) as weights:
            load_weights(llm, weights, "", dtype, device, convert=llm_convert)
        vision = build_empty(lambda: VisionTower(config))
        depth_convert = LinearConverter(scheme, DEPTH_TARGETS, dtype, run_device, cache, part="depth")
        vision.load(config.vision_tower_dir, dtype, device, depth_convert)
        log_kept_layers(scheme, dtype, llm_convert, depth_convert)
        projector = build_empty(lambda: Projector(config.projector))
        with SafetensorsFolder(config.projector_dir) as weights:
            load_weights(projector, weights, "", dtype, device)
        if cache is not None:
            cache.commit()
        return cls(config, tokenizer, llm, vision, projector, dtype, scheme)

    @property
    def device(self) -> torch.device:
        """Where the weights are now: read from them, because ComfyUI's model management
        may move the modules between runs."""
        return next(self.projector.parameters()).device

    def weight_bytes(self) -> int:
        """Memory the weights take, as stored (quantized layers at their packed size)."""
        return module_bytes(self.networks)

    def to(self, device: str | torch.device) -> VilaUModel:
        self.networks.to(device)
        self.release_step_states()
        return self

    def step_state_bytes(self) -> int:
        """Memory the compiled steps keep between runs (KV cache, buffers), for the host to count."""
        return held_bytes(self.step_states.values())

    def release_step_states(self) -> None:
        """Free the memory the compiled image and answer steps keep between runs (KV caches, buffers)."""
        self.step_states.clear()

    # ---- vision API -------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE (B, H, W, C) -> pixel_values (B, 3, S, S) float32 on the CPU."""
        return preprocess_images(images, self.config.image_size, self.config.image_aspect_ratio)

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> EncodedImages:
        """pixel_values (B, 3, S, S) -> codes (B, h, w, D), z_q and summed features (B, h, w, C)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise InputError(f"pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        features = self.vision.siglip(pixels)  # (B, h, w, C)
        codes, z_q = self.vision.quantizer.quantize(features)
        return EncodedImages(codes=codes, z_q=z_q, features=self.vision.quantizer.codes_to_features(codes))

    def encode_images(self, images: torch.Tensor) -> EncodedImages:
        """ComfyUI IMAGE (B, H, W, C) float 0..1, any size -> codes and features."""
        return self.encode_pixels(self.preprocess(images))

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features (..., C) -> LLM input embeddings (..., H)."""
        return self.projector(features.to(device=self.device, dtype=self.dtype))

    @torch.inference_mode()
    def codes_to_features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w, D) -> summed code embeddings (B, h, w, C)."""
        self.check_codes(codes)
        return self.vision.quantizer.codes_to_features(codes.to(self.device))

    @torch.inference_mode()
    def decode_features_raw(self, features: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) summed code embeddings -> raw decoder output (B, 3, H, W) in the model dtype."""
        c = self.config.quantizer.embed_dim
        if features.ndim != 4 or features.shape[-1] != c:
            raise InputError(
                f"VILA-U features must be shaped (batch, h, w, {c}), got {tuple(features.shape)}; "
                "was this latent made by a VILA-U encode or generation node of the same model?"
            )
        return self.vision.pixel_decoder(features.to(device=self.device, dtype=self.dtype))

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> ComfyUI IMAGE (B, H, W, 3) float32 0..1 on the CPU."""
        return to_comfy_images(self.decode_features_raw(features)).cpu()

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w, D) -> ComfyUI IMAGE (B, H, W, 3) float32 0..1 on the CPU."""
        return self.decode_features(self.codes_to_features(codes))

    def check_codes(self, codes: torch.Tensor) -> None:
        q = self.config.quantizer
        if codes.ndim != 4 or codes.shape[-1] != q.depth:
            raise InputError(f"codes must be shaped (batch, h, w, {q.depth}), got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= q.n_embed):
            raise InputError(f"codes must lie in 0..{q.n_embed - 1}, found {int(codes.min())}..{int(codes.max())}")


def _build_llm(config: VilaUConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_config = LlamaConfig.from_pretrained(config.llm_dir)
    llm_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(llm_config)


def _check_tokenizer_matches(config: VilaUConfig, tokenizer: VilaTokenizer) -> None:
    # The start tokens are recognised as vocab-4 / vocab-2 of the LLM, so the embedding
    # table and the tokenizer must agree on their size.
    if len(tokenizer) != config.llm.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {config.llm_dir} has {len(tokenizer)} tokens but the LLM's vocab_size is "
            f"{config.llm.vocab_size}",
            hint="llm/ mixes files from two checkpoints; download it again",
        )
