"""`python -m vilau_backend`: the backend from the command line, as the original's inference.py.

Subcommands:
    encode  --model DIR --image A.png [--image B.png ...] --out codes.safetensors
    decode  --model DIR --codes codes.safetensors --out-dir DIR

Every subcommand takes --dtype float32|bfloat16|float16 (default: bfloat16 on a
GPU, float32 on the CPU) and --device (default: cuda when available).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import VilaUError

def load_image_file(path: str | Path) -> torch.Tensor:
    """An image file -> ComfyUI IMAGE (1, H, W, C) float 0..1, channels as stored (1, 3 or 4)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode not in ("RGB", "RGBA", "L"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise VilaUError(f"cannot read image {path}: {exc}") from exc
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array)[None]


def save_image_file(image: torch.Tensor, path: str | Path) -> None:
    """(H, W, 3) float 0..1 -> PNG, truncating to 8 bits as the original's inference.py does."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    Image.fromarray(array, mode="RGB").save(path)


def _load_model(args: argparse.Namespace):
    from .model import VilaUModel

    return VilaUModel.load(args.model, dtype=args.dtype, device=args.device)


def _encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    model = _load_model(args)
    images = [load_image_file(p) for p in args.image]
    # each file may have its own size: preprocess one by one, encode as one batch
    pixels = torch.cat([model.preprocess(image) for image in images])
    codes = model.encode_pixels(pixels).codes.cpu().to(torch.int64).contiguous()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"codes": codes}, str(args.out))
    print(f"wrote {args.out}: codes {list(codes.shape)}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    model = _load_model(args)
    tensors = load_file(args.codes)
    if "codes" not in tensors:
        raise VilaUError(f"{args.codes} has no tensor named 'codes' (found: {', '.join(tensors) or 'none'})")
    images = model.decode_codes(tensors["codes"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image_file(image, out_dir / f"image_{i}.png")
    print(f"wrote {len(images)} image(s) to {out_dir}")
    return 0


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VILA-U model folder (config.json, llm/, vision_tower/, mm_projector/)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vilau_backend", description="VILA-U without ComfyUI")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="images -> RQ codes (safetensors tensor 'codes', int64 [B,h,w,D])")
    add_model_options(p)
    p.add_argument("--image", action="append", required=True, help="an image file; repeat for a batch")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(run=_encode)

    p = sub.add_parser("decode", help="RQ codes -> images image_0.png, image_1.png, ...")
    add_model_options(p)
    p.add_argument("--codes", required=True, help=".safetensors file with tensor 'codes' [B,h,w,D]")
    p.add_argument("--out-dir", required=True, help="folder for the PNGs")
    p.set_defaults(run=_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VilaUError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
