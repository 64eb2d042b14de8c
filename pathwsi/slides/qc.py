"""QC pictures a person can check at a glance: tissue mask and kept tiles on a thumbnail.

They are sized for the Snakemake report, which embeds every one of them: the tiling picture is
drawn no finer than shows a kept tile `TILE_PX_MAX` px wide (nor larger than `qc.max_px`), the stain
strip at most `STRIP_PX_MAX` px wide, and both are saved with a 256-colour adaptive palette. On the
34 demo slides this takes the two pictures of a slide from 2.4 MB to the figures in docs/stain.md
("QC pictures"); `test_qc_pictures_of_a_demo_sized_slide_stay_small` holds the bound.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pathwsi.runtime.outputs import atomic_path

MASK_TINT = np.array([0, 170, 80], np.float32)
MASK_LEGEND = (120, 200, 150)  # the tint on a light background
TILE_OUTLINE = (20, 60, 220)
SCALE_BARS_MM = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
LINE_PX = 14  # height of a line of the default bitmap font, with spacing
TILE_PX_MAX = 64  # the tiling picture is drawn no finer than shows a kept tile this many px wide
STRIP_PX_MAX = 960  # the widest stain strip (px); Snakemake 9's report shows a picture at its own size in a
# pane 3/4 of the window wide, less 24 px: 1056 px of a 1440 px window
PALETTE_COLOURS = 256
LegendEntry = tuple[tuple[int, int, int], str, bool]  # colour, label, filled swatch (else an outline)


def overview_mpp(slide_um: float, max_px: int, tile_um: float, level0_mpp: float) -> float:
    """µm/px of the tiling picture: the longest side (`slide_um`) in `max_px`, a tile at most TILE_PX_MAX px
    wide, never finer than level 0."""
    return max(slide_um / max_px, tile_um / TILE_PX_MAX, level0_mpp)


def narrowed(image: Image.Image, max_px: int = STRIP_PX_MAX) -> Image.Image:
    """`image` scaled down (area-averaged, so mean colours stay) to at most `max_px` wide."""
    if image.width <= max_px:
        return image
    return image.resize((max_px, max(1, round(image.height * max_px / image.width))), Image.Resampling.BOX)


def tiles_overview(
    thumbnail: np.ndarray, mask: np.ndarray, coords_um: np.ndarray, tile_um: float, thumb_mpp: float
) -> Image.Image:
    """Thumbnail with the tissue mask tinted green and each kept tile outlined in blue."""
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (thumbnail.shape[1], thumbnail.shape[0]), Image.Resampling.NEAREST
    )
    tinted = thumbnail.astype(np.float32)
    inside = np.asarray(mask_img) > 0
    tinted[inside] = 0.75 * tinted[inside] + 0.25 * MASK_TINT
    image = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = tile_um / thumb_mpp
    for x_um, y_um in coords_um:
        x, y = x_um / thumb_mpp, y_um / thumb_mpp
        draw.rectangle([x, y, x + side - 1, y + side - 1], outline=TILE_OUTLINE)
    return image


def titled(image: Image.Image, lines: Sequence[str], legend: Sequence[LegendEntry] = ()) -> Image.Image:
    """`image` under a white band of `lines` (a title), above a band of `legend` entries."""
    width = max(image.width, 480)
    top, bottom = 8 + LINE_PX * len(lines), (8 + LINE_PX) if legend else 0
    canvas = Image.new("RGB", (width, top + image.height + bottom), "white")
    canvas.paste(image, (0, top))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((6, 4 + LINE_PX * row), line, fill=(0, 0, 0))
    x, y = 6, top + image.height + 4
    for colour, label, filled in legend:
        draw.rectangle([x, y + 2, x + 10, y + 10], outline=colour, fill=colour if filled else None)
        draw.text((x + 14, y), label, fill=(0, 0, 0))
        x += 24 + int(draw.textlength(label))
    return canvas


def scale_bar(image: Image.Image, mpp: float) -> Image.Image:
    """`image` (at `mpp` µm/px) with a scale bar in mm at its bottom left, about a fifth of its width."""
    mm = min(SCALE_BARS_MM, key=lambda length: abs(length * 1000 / mpp - image.width / 5))
    length = round(mm * 1000 / mpp)
    out = image.copy()
    draw = ImageDraw.Draw(out)
    x, y = 8, out.height - 12
    draw.rectangle([x - 3, y - 14, x + length + 3, y + 6], fill=(255, 255, 255))
    draw.rectangle([x, y, x + length, y + 3], fill=(0, 0, 0))
    draw.text((x, y - 13), f"{mm:g} mm", fill=(0, 0, 0))
    return out


def message_card(title: str, message: str, width: int = 640) -> Image.Image:
    """A plain picture that says why there is nothing to show (failed or empty slide)."""
    lines = [title, ""] + textwrap.wrap(message, width=90)
    image = Image.new("RGB", (width, 24 + 16 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((12, 12 + 16 * row), line, fill=(160, 0, 0) if row == 0 else (0, 0, 0))
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG with an adaptive 256-colour palette (max-coverage, refined by one k-means pass), through a
    temporary name so a crash never leaves a half-written file."""
    palette = image.convert("RGB").quantize(PALETTE_COLOURS, method=Image.Quantize.MAXCOVERAGE, kmeans=1)
    with atomic_path(path) as temporary:
        palette.save(temporary, format="PNG", optimize=True)
