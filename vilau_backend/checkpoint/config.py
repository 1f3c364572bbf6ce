"""Parse a VILA-U checkpoint folder into frozen dataclasses, once.

The published layout (mit-han-lab/vila-u-7b-256, -384):

    <model>/config.json         model_type "vila_u_llama" (or "vila_u"), llm_cfg, vision_tower_cfg, ...
    <model>/llm/                Hugging Face Llama checkpoint + sentencepiece tokenizer
    <model>/vision_tower/       config.json (rqvaesiglip + rqtransformer) + safetensors
    <model>/mm_projector/       config.json + safetensors

Everything the modules need is read here and nowhere else: model code receives
these dataclasses and never looks at JSON or guesses sizes from hidden widths.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

ACCEPTED_MODEL_TYPES = ("vila_u_llama", "vila_u")

# The vision tower names its SigLIP by hub id. These are the vision halves of
# the public config.json files of the two SigLIPs the published models use,
# so that loading never needs the network.
KNOWN_SIGLIP_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "google/siglip-large-patch16-256": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 256,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    },
    "google/siglip-so400m-patch14-384": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    },
}


@dataclass(frozen=True)
class SiglipVisionSpec:
    """The SigLIP vision encoder. VILA-U runs all layers but the last."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float
    source: str  # hub id or folder the config came from, for messages

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def layers_used(self) -> int:
        # as the original: features are taken after layer len(layers)-2
        return self.num_hidden_layers - 1


@dataclass(frozen=True)
class QuantizerSpec:
    """Residual quantizer: `depth` codebooks applied to successive residuals."""

    n_embed: int  # codes per codebook (each stored with one extra padding row)
    embed_dim: int  # code vector width, equal to the SigLIP width
    grid: tuple[int, int]  # (h, w) code grid
    depth: int  # D
    shared_codebook: bool


@dataclass(frozen=True)
class DecoderSpec:
    """The conv pixel decoder (taming-style) that turns code sums into pixels."""

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    latent_shape: tuple[int, int] | None  # decoder_latent_shape: resize codes before decoding


@dataclass(frozen=True)
class DepthSpec:
    """The depth transformer predicting the D codes of one grid position."""

    embed_dim: int
    n_layer: int
    n_head: int
    vocab_size: int  # codes per codebook
    depth: int  # D
    code_dim: int  # input_embed_dim_1: width of code embeddings
    llm_dim: int  # input_embed_dim_2: width of the LLM hidden state


_PROJECTOR_KIND = re.compile(r"linear|mlp(\d+)x_gelu")


@dataclass(frozen=True)
class ProjectorSpec:
    """Vision features -> LLM embeddings: 'linear' or 'mlp{N}x_gelu'."""

    kind: str
    in_dim: int
    out_dim: int
    mlp_depth: int = field(init=False)  # N Linear layers, from `kind`; 1 for 'linear'

    def __post_init__(self) -> None:
        match = _PROJECTOR_KIND.fullmatch(self.kind) if isinstance(self.kind, str) else None
        if match is None:
            raise ValueError(f"unsupported mm_projector_type {self.kind!r}; expected 'linear' or 'mlpNx_gelu'")
        object.__setattr__(self, "mlp_depth", int(match.group(1) or 1))


@dataclass(frozen=True)
class LlmSpec:
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    rope_linear_factor: float  # rope_scaling {"type": "linear", "factor": f}; 1.0 without
    tokenizer_model_max_length: int | None

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + generated) the LLM was set up for: linear RoPE scaling
        stretches the trained positions by its factor, as VILA-U's training did (8192 for the
        published models); the tokenizer's model_max_length caps it when smaller."""
        stretched = int(self.max_position_embeddings * self.rope_linear_factor)
        if self.tokenizer_model_max_length:
            return min(stretched, int(self.tokenizer_model_max_length))
        return stretched


@dataclass(frozen=True)
class VilaUConfig:
    root: Path
    llm: LlmSpec
    siglip: SiglipVisionSpec
    quantizer: QuantizerSpec
    decoder: DecoderSpec
    depth: DepthSpec
    projector: ProjectorSpec
    image_aspect_ratio: str  # 'resize' or 'pad'
    num_video_frames: int
    mm_use_im_start_end: bool
    mm_use_vi_start_end: bool
    mm_use_im_patch_token: bool

    @property
    def image_size(self) -> int:
        return self.siglip.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.quantizer.grid

    @property
    def tokens_per_image(self) -> int:
        h, w = self.quantizer.grid
        return h * w

    @property
    def llm_dir(self) -> Path:
        return self.root / "llm"

    @property
    def vision_tower_dir(self) -> Path:
        return self.root / "vision_tower"

    @property
    def projector_dir(self) -> Path:
        return self.root / "mm_projector"


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}", hint=_LAYOUT_HINT)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


_LAYOUT_HINT = (
    "a VILA-U model folder holds config.json, llm/, vision_tower/ and mm_projector/ "
    "as published in mit-han-lab/vila-u-7b-256 or mit-han-lab/vila-u-7b-384; "
    "download the whole repository into one folder"
)


def is_vila_u_folder(path: Path) -> bool:
    """Cheap check used to list models: a folder whose config.json says VILA-U."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") in ACCEPTED_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def load_config(root: str | Path) -> VilaUConfig:
    """Read and check the whole config tree of a model folder."""
    root = Path(root)
    top = _top_config(root)
    # The sub-folders' own config.json files are what the original builds from;
    # the copies inside the root config are only a fallback.
    llm = _llm_spec(root / "llm" / "config.json")
    vt_path = root / "vision_tower" / "config.json"
    vision_tower = read_json(vt_path)
    siglip = _siglip_spec(_req(vision_tower, "rqvaesiglip", vt_path), root / "vision_tower")
    quantizer = _quantizer_spec(vision_tower, vt_path, siglip)
    depth = _depth_spec(vision_tower, vt_path, quantizer)
    projector = _projector_spec(
        root / "mm_projector" / "config.json", in_dim=top.get("mm_hidden_size", siglip.hidden_size), out_dim=llm.hidden_size
    )
    return VilaUConfig(
        root=root,
        llm=llm,
        siglip=siglip,
        quantizer=quantizer,
        decoder=_decoder_spec(vision_tower, vt_path),
        depth=depth,
        projector=projector,
        image_aspect_ratio=_image_aspect_ratio(top, root / "config.json"),
        num_video_frames=int(top.get("num_video_frames", 8)),
        mm_use_im_start_end=bool(top.get("mm_use_im_start_end", False)),
        mm_use_vi_start_end=bool(top.get("mm_use_vi_start_end", False)),
        mm_use_im_patch_token=bool(top.get("mm_use_im_patch_token", True)),  # the original's default
    )


def _top_config(root: Path) -> dict[str, Any]:
    """The root config.json, once the folder is known to hold a VILA-U model's three parts."""
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist", hint=_LAYOUT_HINT)
    top = read_json(root / "config.json")
    model_type = top.get("model_type")
    if model_type not in ACCEPTED_MODEL_TYPES:
        raise CheckpointError(
            f"{root / 'config.json'} has model_type {model_type!r}; a VILA-U checkpoint says "
            f"{' or '.join(repr(t) for t in ACCEPTED_MODEL_TYPES)}",
            hint="point the loader at the folder of a VILA-U model, not at one of its sub-folders or another model",
        )
    for sub in ("llm", "vision_tower", "mm_projector"):
        if not (root / sub).is_dir():
            raise CheckpointError(f"model folder {root} has no {sub}/ sub-folder", hint=_LAYOUT_HINT)
    return top


def _llm_spec(path: Path) -> LlmSpec:
    cfg = read_json(path)
    return LlmSpec(
        hidden_size=_req(cfg, "hidden_size", path),
        vocab_size=_req(cfg, "vocab_size", path),
        num_hidden_layers=_req(cfg, "num_hidden_layers", path),
        max_position_embeddings=_req(cfg, "max_position_embeddings", path),
        rope_linear_factor=_rope_linear_factor(cfg),
        tokenizer_model_max_length=cfg.get("tokenizer_model_max_length"),
    )


def _quantizer_spec(vision_tower: dict[str, Any], path: Path, siglip: SiglipVisionSpec) -> QuantizerSpec:
    code_shape = _req(vision_tower, "rqvaesiglip.code_shape", path)  # (h, w, D)
    latent_shape = _req(vision_tower, "rqvaesiglip.latent_shape", path)
    if list(code_shape[:2]) != list(latent_shape[:2]):
        # the original supports pooling latents into coarser codes, but no published model does
        raise CheckpointError(
            f"{path}: code_shape {code_shape} and latent_shape {latent_shape} differ in their grid; "
            "only checkpoints whose code grid equals the SigLIP grid are supported"
        )
    if tuple(code_shape[:2]) != (siglip.grid, siglip.grid):
        raise CheckpointError(
            f"{path}: code grid {code_shape[:2]} does not match the SigLIP grid "
            f"{siglip.image_size}/{siglip.patch_size} = {siglip.grid} of {siglip.source}"
        )
    quantizer = QuantizerSpec(
        n_embed=_req(vision_tower, "rqvaesiglip.n_embed", path),
        embed_dim=_req(vision_tower, "rqvaesiglip.embed_dim", path),
        grid=(int(code_shape[0]), int(code_shape[1])),
        depth=int(code_shape[2]),
        shared_codebook=bool(vision_tower["rqvaesiglip"].get("shared_codebook", False)),
    )
    if quantizer.embed_dim != siglip.hidden_size:
        raise CheckpointError(
            f"{path}: rqvaesiglip.embed_dim {quantizer.embed_dim} differs from the SigLIP width "
            f"{siglip.hidden_size} of {siglip.source}"
        )
    return quantizer


def _decoder_spec(vision_tower: dict[str, Any], path: Path) -> DecoderSpec:
    def dd(key: str) -> Any:
        return _req(vision_tower, f"rqvaesiglip.ddconfig.{key}", path)

    rqvae = vision_tower["rqvaesiglip"]
    latent = rqvae.get("decoder_latent_shape")
    return DecoderSpec(
        ch=dd("ch"),
        out_ch=dd("out_ch"),
        ch_mult=tuple(dd("ch_mult")),
        num_res_blocks=dd("num_res_blocks"),
        attn_resolutions=tuple(rqvae["ddconfig"].get("attn_resolutions", ())),
        resolution=dd("resolution"),
        z_channels=dd("z_channels"),
        latent_shape=tuple(latent) if latent else None,
    )


def _depth_spec(vision_tower: dict[str, Any], path: Path, quantizer: QuantizerSpec) -> DepthSpec:
    def rqt(key: str) -> Any:
        return _req(vision_tower, f"rqtransformer.{key}", path)

    depth = DepthSpec(
        embed_dim=rqt("embed_dim"),
        n_layer=rqt("head.n_layer"),
        n_head=rqt("head.block.n_head"),
        vocab_size=rqt("vocab_size"),
        depth=int(rqt("block_size")[2]),  # block_size (h, w, D)
        code_dim=rqt("input_embed_dim_1"),
        llm_dim=rqt("input_embed_dim_2"),
    )
    if depth.depth != quantizer.depth:
        raise CheckpointError(
            f"{path}: the depth transformer predicts {depth.depth} codes per position but the quantizer has depth {quantizer.depth}"
        )
    return depth


def _image_aspect_ratio(top: dict[str, Any], path: Path) -> str:
    aspect = top.get("image_aspect_ratio", "resize")
    if aspect not in ("resize", "pad"):
        raise CheckpointError(
            f"{path}: image_aspect_ratio {aspect!r} is not supported at inference; "
            "the original accepts 'resize' or 'pad'"
        )
    return aspect


def _req(cfg: dict[str, Any], key: str, path: Path) -> Any:
    """`cfg[key]`, where a dotted key ('ddconfig.ch') walks nested objects."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(f"{path} has no {key!r} entry; the file is incomplete or not a VILA-U config")
        value = value[part]
    return value


def _rope_linear_factor(llm_cfg: dict[str, Any]) -> float:
    scaling = llm_cfg.get("rope_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    return float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0


def _siglip_spec(rqvae: dict[str, Any], vision_tower_dir: Path) -> SiglipVisionSpec:
    name = rqvae.get("pretrained_model")
    if not name:
        raise CheckpointError(f"{vision_tower_dir / 'config.json'} has no rqvaesiglip.pretrained_model")
    folder = Path(name) if Path(name).is_absolute() else vision_tower_dir / name
    if (folder / "config.json").is_file():
        cfg = read_json(folder / "config.json")
        vision = cfg.get("vision_config", cfg)
        source = str(folder)
    elif name in KNOWN_SIGLIP_VISION_CONFIGS:
        vision = KNOWN_SIGLIP_VISION_CONFIGS[name]
        source = name
    else:
        known = ", ".join(KNOWN_SIGLIP_VISION_CONFIGS)
        raise CheckpointError(
            f"{vision_tower_dir / 'config.json'} names SigLIP {name!r}, which is neither a known SigLIP ({known}) "
            f"nor a folder with a config.json (looked at {folder})",
            hint="put that SigLIP's config.json in the folder, or set rqvaesiglip.pretrained_model to a known SigLIP id",
        )
    try:
        return SiglipVisionSpec(
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            num_channels=vision.get("num_channels", 3),
            hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            attention_dropout=vision.get("attention_dropout", 0.0),
            source=source,
        )
    except KeyError as exc:
        raise CheckpointError(f"SigLIP config from {source} lacks {exc.args[0]!r}") from exc


def _projector_spec(path: Path, in_dim: int, out_dim: int) -> ProjectorSpec:
    kind = read_json(path).get("mm_projector_type")
    try:
        return ProjectorSpec(kind=kind, in_dim=in_dim, out_dim=out_dim)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
