"""QC pictures a person can check at a glance: tissue mask and kept tiles on a thumbnail."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pathwsi.runtime.outputs import atomic_path

MASK_TINT = np.array([0, 170, 80], np.float32)
TILE_OUTLINE = (20, 60, 220)


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


def message_card(title: str, message: str, width: int = 640) -> Image.Image:
    """A plain picture that says why there is nothing to show (failed or empty slide)."""
    lines = [title, ""] + textwrap.wrap(message, width=90)
    image = Image.new("RGB", (width, 24 + 16 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((12, 12 + 16 * row), line, fill=(160, 0, 0) if row == 0 else (0, 0, 0))
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary name so a crash never leaves a half-written file."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
