"""Draw the pack's icon (docs/icon.png) and the example inputs the templates open with (example_inputs/).

    .venv/bin/python -m dev.scripts.draw_assets

Everything here is drawn from shapes by this script (no photographs, no third-party
pictures), so the files carry the pack's own license. The pack copies example_inputs/
into ComfyUI's input folder when it loads (nodes/example_inputs.py), keeping any file
of the same name that is there already. Deterministic: the same files every run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[2]
INPUTS = REPO / "example_inputs"
CAPTION_FOLDER = "vila-u-caption-example"  # as the Caption Folder template's folder


def gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    w, h = size
    column = Image.new("RGB", (1, h))
    for y in range(h):
        t = y / max(1, h - 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return column.resize((w, h))


def draw_scene(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int], shapes: list[tuple]) -> Image.Image:
    """A sky-to-ground gradient with `shapes` drawn on it, smoothed. Each shape is (ImageDraw method,
    its points as x, y, x, y, ... on a 256 px canvas, options); points and line widths scale to `size`."""
    s = size / 256
    im = gradient((size, size), top, bottom)
    d = ImageDraw.Draw(im)
    for method, points, options in shapes:
        if "width" in options:
            options = {**options, "width": max(1, round(options["width"] * s))}
        getattr(d, method)([v * s for v in points], **options)
    return im.filter(ImageFilter.SMOOTH)


def landscape(size: int = 256, sun_x: float = 0.72) -> Image.Image:
    """Hills under a morning sky, a lake, a red-roofed house and a tree."""
    sun = sun_x * 256
    return draw_scene(size, (110, 170, 235), (230, 220, 200), [
        ("ellipse", [sun - 22, 40, sun + 22, 84], dict(fill=(255, 214, 90))),
        ("polygon", [0, 150, 70, 95, 140, 150], dict(fill=(120, 135, 160))),
        ("polygon", [90, 150, 180, 80, 256, 150], dict(fill=(100, 118, 150))),
        ("rectangle", [0, 150, 256, 256], dict(fill=(96, 160, 80))),
        ("ellipse", [20, 190, 140, 240], dict(fill=(70, 130, 200))),
        ("rectangle", [160, 160, 220, 205], dict(fill=(235, 225, 205))),
        ("polygon", [152, 162, 190, 132, 228, 162], dict(fill=(190, 50, 40))),
        ("rectangle", [183, 180, 197, 205], dict(fill=(110, 70, 40))),
        ("rectangle", [236, 150, 244, 200], dict(fill=(100, 70, 40))),
        ("ellipse", [218, 112, 262, 160], dict(fill=(50, 120, 60))),
    ])


def still_life(size: int = 256) -> Image.Image:
    """A red apple and a blue cup on a wooden table before a green wall."""
    return draw_scene(size, (170, 200, 160), (140, 170, 130), [
        ("rectangle", [0, 160, 256, 256], dict(fill=(150, 100, 60))),
        ("line", [0, 160, 256, 160], dict(fill=(110, 70, 40), width=3)),
        ("ellipse", [50, 120, 120, 188], dict(fill=(200, 30, 35))),
        ("line", [85, 124, 92, 104], dict(fill=(90, 60, 30), width=4)),
        ("ellipse", [92, 100, 116, 112], dict(fill=(60, 140, 50))),
        ("rectangle", [150, 110, 205, 185], dict(fill=(40, 80, 190))),
        ("ellipse", [150, 178, 205, 192], dict(fill=(40, 80, 190))),
        ("ellipse", [150, 103, 205, 117], dict(fill=(25, 50, 130))),
        ("arc", [192, 125, 225, 165], dict(start=-90, end=90, fill=(40, 80, 190), width=7)),
    ])


def lighthouse(size: int = 256) -> Image.Image:
    """A red-striped lighthouse on a rock at sunset."""
    stripes = [("rectangle", [168, y, 202, y + 10], dict(fill=(200, 40, 40))) for y in (80, 110, 140)]
    return draw_scene(size, (250, 160, 90), (120, 90, 150), [
        ("rectangle", [0, 170, 256, 256], dict(fill=(40, 70, 120))),
        ("polygon", [120, 180, 150, 150, 230, 160, 256, 185], dict(fill=(70, 60, 60))),
        ("polygon", [165, 155, 175, 60, 195, 60, 205, 155], dict(fill=(240, 240, 235))),
        *stripes,
        ("rectangle", [172, 45, 198, 60], dict(fill=(255, 230, 120))),
        ("polygon", [168, 45, 185, 30, 202, 45], dict(fill=(60, 60, 60))),
    ])


def night_city(size: int = 256) -> Image.Image:
    s = size / 256
    im = gradient((size, size), (10, 15, 45), (40, 40, 90))
    d = ImageDraw.Draw(im)
    d.ellipse([30 * s, 25 * s, 60 * s, 55 * s], fill=(240, 240, 210))
    for i, (x, w, h) in enumerate([(0, 40, 120), (45, 35, 170), (85, 50, 100), (140, 30, 190), (175, 45, 140),
                                   (225, 31, 110)]):
        top = size - h * s
        d.rectangle([x * s, top, (x + w) * s, size], fill=(25 + 5 * i, 25 + 4 * i, 40 + 6 * i))
        for wy in range(int(top + 8 * s), size - 6, max(2, round(14 * s))):
            for wx in range(int((x + 5) * s), int((x + w - 6) * s), max(2, round(10 * s))):
                if (wx * 7 + wy * 3 + i) % 5 < 3:
                    d.rectangle([wx, wy, wx + 4 * s, wy + 6 * s], fill=(255, 210, 110))
    return im


def masked(scene: Image.Image) -> Image.Image:
    """The scene with a square of sky left transparent: what Load Image's mask editor saves when a
    region is painted (Load Image's MASK output is 1 there)."""
    rgba = scene.convert("RGBA")
    s = scene.width / 256
    ImageDraw.Draw(rgba).rectangle([32 * s, 32 * s, 127 * s, 95 * s], fill=(0, 0, 0, 0))  # whole grid cells
    return rgba


def bouncing_ball_frames(size: int = 256, frames: int = 24) -> list[Image.Image]:
    """A red ball rolling across the landscape and bouncing."""
    out = []
    for i in range(frames):
        t = i / (frames - 1)
        im = landscape(size, sun_x=0.6 + 0.2 * t)
        d = ImageDraw.Draw(im)
        x = (20 + 216 * t) * size / 256
        y = (150 - 90 * abs(math.sin(3 * math.pi * t))) * size / 256
        r = 14 * size / 256
        d.ellipse([x - r, y - r, x + r, y + r], fill=(220, 30, 30), outline=(120, 10, 10))
        out.append(im)
    return out


def write_video(path: Path, frames: list[Image.Image], fps: int = 8) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "28"})
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def icon(size: int = 512) -> Image.Image:
    """A dark tile with a grid of code cells; the cells of a 'U' are lit, each as a stack of
    three offset layers (the residual depth of VILA-U's codes)."""
    scale = 4  # drawn large, then reduced: smooth edges
    big = size * scale
    im = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rounded_rectangle([0, 0, big - 1, big - 1], radius=big // 6, fill=(24, 28, 48))
    n, margin = 6, big * 0.14
    cell = (big - 2 * margin) / n
    lit = {(r, c) for r in range(n) for c in range(n) if (c in (1, 4) and r <= 4) or (r == 5 and 1 <= c <= 4)}
    lit |= {(4, 1), (4, 4)}
    for r in range(n):
        for c in range(n):
            x, y = margin + c * cell, margin + r * cell
            pad = cell * 0.1
            box = [x + pad, y + pad, x + cell - pad, y + cell - pad]
            if (r, c) not in lit:
                d.rounded_rectangle(box, radius=cell * 0.12, fill=(48, 56, 90))
                continue
            t = (r + c) / (2 * n - 2)
            color = (255, round(150 - 90 * t), round(60 + 140 * t))
            for k, shade in ((2, 0.45), (1, 0.7), (0, 1.0)):
                off = k * cell * 0.07
                layer = [box[0] + off, box[1] - off, box[2] + off, box[3] - off]
                d.rounded_rectangle(layer, radius=cell * 0.12, fill=tuple(round(v * shade) for v in color))
    return im.resize((size, size), Image.LANCZOS)


def main() -> None:
    INPUTS.mkdir(exist_ok=True)
    scene = landscape()
    scene.save(INPUTS / "vila-u-example.png", optimize=True)
    still_life().save(INPUTS / "vila-u-example-2.png", optimize=True)
    masked(scene).save(INPUTS / "vila-u-example-masked.png", optimize=True)
    captions = INPUTS / CAPTION_FOLDER
    captions.mkdir(exist_ok=True)
    for name, draw in (("lighthouse", lighthouse), ("night_city", night_city)):
        draw().save(captions / f"{name}.png", optimize=True)
    write_video(INPUTS / "vila-u-example.mp4", bouncing_ball_frames())
    icon().save(REPO / "docs" / "icon.png", optimize=True)
    for path in sorted([*INPUTS.rglob("*.*"), REPO / "docs" / "icon.png"]):
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
