"""A non-overlapping grid of square tiles in physical units, and each tile's tissue fraction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathwsi.slides.tissue_mask import TissueMask


@dataclass(frozen=True)
class TileSettings:
    """Tile geometry and selection (config section `tiling`)."""

    tile_px: int = 224
    tile_mpp: float = 0.5
    min_tissue_fraction: float = 0.5
    backend: str = "auto"  # the library that opens the slide (pathwsi.slides.backends)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TileSettings:
        """From a validated config's `tiling` section."""
        return cls(**config["tiling"])

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.tile_mpp


def tile_grid(width0: int, height0: int, mpp0: float, tile_um: float) -> np.ndarray:
    """Level-0 (x, y) top-left corners of every whole tile of `tile_um` µm, row by row.

    Tile i starts at i * tile_um µm, rounded to the nearest level-0 pixel, so scans of the same
    tissue at different µm/px give the same physical grid.
    """
    step0 = tile_um / mpp0
    cols = int(np.floor(width0 / step0 + 1e-9))
    rows = int(np.floor(height0 / step0 + 1e-9))
    xs = np.round(np.arange(cols) * step0).astype(np.int64)
    ys = np.round(np.arange(rows) * step0).astype(np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def tissue_fractions(
    coords: np.ndarray, mpp0: float, tile_um: float, tissue: TissueMask, slide_um: tuple[float, float]
) -> np.ndarray:
    """Share of each tile covered by the mask (exact area of mask pixels inside the tile box).

    slide_um is the slide's (width, height) in µm, which the mask spans.
    """
    mask = tissue.mask.astype(np.float64)
    height, width = mask.shape
    px_per_um = np.array([width / slide_um[0], height / slide_um[1]])
    summed = np.zeros((height + 1, width + 1))
    summed[1:, 1:] = mask.cumsum(0).cumsum(1)
    start = coords * mpp0 * px_per_um
    end = (coords * mpp0 + tile_um) * px_per_um
    area = (end[:, 0] - start[:, 0]) * (end[:, 1] - start[:, 1])
    covered = (
        _bilinear(summed, end[:, 0], end[:, 1])
        - _bilinear(summed, start[:, 0], end[:, 1])
        - _bilinear(summed, end[:, 0], start[:, 1])
        + _bilinear(summed, start[:, 0], start[:, 1])
    )
    return np.clip(covered / area, 0.0, 1.0)


def _bilinear(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of `table` at continuous (x, y); exact for a summed-area table."""
    x = np.clip(x, 0, table.shape[1] - 1)
    y = np.clip(y, 0, table.shape[0] - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), table.shape[1] - 2)
    y0 = np.minimum(np.floor(y).astype(np.int64), table.shape[0] - 2)
    fx, fy = x - x0, y - y0
    top = table[y0, x0] * (1 - fx) + table[y0, x0 + 1] * fx
    bottom = table[y0 + 1, x0] * (1 - fx) + table[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy
