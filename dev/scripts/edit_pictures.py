"""Before/after pictures of each code-space edit, made with a small random VILA-U model.

    .venv/bin/python -m dev.scripts.edit_pictures [--out docs] [--model DIR]

The small model's weights are random, so every picture is noise; what the pictures show is
where an edit keeps the source and where it regenerates. Each PNG is one row:
source as the model decodes it | what is regenerated (white) | the edit | |edit - source| x 4,
where the kept parts are black (a pasted-back or kept region is unchanged; the decoder's
receptive field lets a kept region near regenerated codes change a little).
Without --model, a small random checkpoint (64 px, 8x8 grid, depth 4) is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vilau_backend.tasks import editing
from vilau_backend.tasks.generate import generate_codes
from vilau_backend.model.vila_u import VilaUModel

REPO = Path(__file__).resolve().parents[2]

SCALE = 3  # 64 px -> 192 px per panel
PROMPT = "a red apple on a wooden table"


def panel(image: torch.Tensor):
    """(H, W, 3) float 0..1 -> a PIL image scaled up without smoothing."""
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().byte().cpu().numpy()
    im = Image.fromarray(pixels, "RGB")
    return im.resize((im.width * SCALE, im.height * SCALE), Image.Resampling.NEAREST)


def keep_picture(regenerated: torch.Tensor, size: int) -> torch.Tensor:
    """Regenerated share of each position's codes (h, w), or a pixel mask (S, S), in 0..1 -> (S, S, 3) grey levels."""
    grid = regenerated[None, None].float()
    return torch.nn.functional.interpolate(grid, size=(size, size), mode="nearest")[0, 0, :, :, None].expand(-1, -1, 3)


def difference(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return ((after - before).abs() * 4).clamp(0, 1)


def row(path: Path, pictures: list[torch.Tensor]) -> None:
    from PIL import Image

    panels = [panel(p) for p in pictures]
    gap = 6
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    out.save(path, optimize=True)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNGs (default docs/)")
    parser.add_argument("--model", default=None, help="a VILA-U model folder (default: a small random one)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            from vilau_backend.testing.random_checkpoint import write_random_checkpoint

            folder = write_random_checkpoint(Path(tmp) / "vila-u-small")
        model = VilaUModel.load(folder, dtype="float32", device="cpu")
        make_pictures(model, out)


def make_pictures(model, out: Path) -> None:
    h, w = model.config.grid
    D = model.config.quantizer.depth
    source = generate_codes(model, "a blue house", seed=11)  # (1, h, w, D)
    before = model.decode_codes(source)[0]  # (S, S, 3)
    S = before.shape[0]

    mask = torch.zeros(1, S, S)
    mask[:, S // 4 : 3 * S // 4, S // 4 : 3 * S // 4] = 1
    result = editing.inpaint(model, PROMPT, source, mask, images=before[None], feather=2, seed=1)
    after = result.images[0]
    row(out / "edit-inpaint.png", [before, keep_picture(result.regenerated[0], S), after, difference(before, after)])

    kept = editing.depths_for_strength(0.5, D)
    result = editing.vary_by_depth(model, PROMPT, source, kept, seed=1)
    after = result.images[0]
    regenerated_share = torch.full((h, w), 1 - kept / D)
    row(out / "edit-vary-by-depth.png", [before, keep_picture(regenerated_share, S), after, difference(before, after)])

    result = editing.continue_downward(model, PROMPT, source, h // 2, seed=1)
    rows = torch.zeros(h, w)
    rows[h // 2 :] = 1
    after = result.images[0]
    row(out / "edit-continue.png", [before, keep_picture(rows, S), after, difference(before, after)])

    given = generate_codes(model, "waves on a beach", frames=2, seed=5)[0]  # (2, h, w, D)
    video = editing.extend_video(model, PROMPT, given, 4, seed=1)
    given_frames = model.decode_codes(given)
    row(out / "edit-extend-video.png", [*given_frames, *video.images[0]])


if __name__ == "__main__":
    main()
