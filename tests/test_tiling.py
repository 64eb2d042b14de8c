"""The tile grid: physical geometry, exact tissue fractions, tiles on tissue only."""

from __future__ import annotations

import numpy as np
import pytest

from pathwsi.slides.grid import TileSettings, tile_grid, tissue_fractions
from pathwsi.slides.slide import Slide
from pathwsi.slides.tissue_mask import TissueMask, detect_tissue


def test_grid_is_whole_tiles_in_physical_units():
    coords = tile_grid(1000, 500, 0.25, 112.0)  # 250 x 125 µm: 2 x 1 whole tiles of 112 µm
    np.testing.assert_array_equal(coords, [[0, 0], [448, 0]])
    coords = tile_grid(2000, 1000, 0.5, 112.0)  # same tissue at 0.5 µm/px: 1000 x 500 µm
    assert len(coords) == 8 * 4
    np.testing.assert_array_equal(coords[:3], [[0, 0], [224, 0], [448, 0]])


def test_non_integer_steps_round_to_the_nearest_level0_pixel():
    coords = tile_grid(2000, 500, 0.2527, 112.0)
    expected = np.round(np.arange(len(np.unique(coords[:, 0]))) * 112.0 / 0.2527)
    np.testing.assert_array_equal(np.unique(coords[:, 0]), expected)


def test_tissue_fractions_are_exact_areas():
    mask = np.zeros((10, 10), bool)
    mask[2:6, :] = True  # 10 µm mask pixels: tissue from y = 20 to 60 µm
    tissue = TissueMask(mask, 10.0, 0.1)
    coords = np.array([[0, 0], [0, 20], [0, 40], [0, 10], [0, 50]])  # level 0 at 1 µm/px
    fractions = tissue_fractions(coords, 1.0, 20.0, tissue, (100.0, 100.0))
    np.testing.assert_allclose(fractions, [0.0, 1.0, 1.0, 0.5, 0.5])
    straddling = tissue_fractions(np.array([[0, 15]]), 1.0, 25.0, tissue, (100.0, 100.0))  # y 15..40 µm
    assert straddling[0] == pytest.approx(20 / 25)


def _kept(slide_path, settings=TileSettings()):
    with Slide(slide_path) as slide:
        mask = detect_tissue(slide.read_whole(16.0), 16.0)
        grid = tile_grid(slide.width, slide.height, slide.mpp.value, settings.tile_um)
        slide_um = (slide.width * slide.mpp.value, slide.height * slide.mpp.value)
        fractions = tissue_fractions(grid, slide.mpp.value, settings.tile_um, mask, slide_um)
        return grid * slide.mpp.value, fractions


def test_kept_tiles_land_on_tissue_and_never_on_background(slides):
    coords_um, fractions = _kept(slides.svs_025)
    kept = coords_um[fractions >= 0.5]
    assert len(kept) >= 10
    truth = np.array([slides.tissue.tissue_fraction(x, y, 112.0, 112.0) for x, y in coords_um])
    kept_truth = truth[fractions >= 0.5]
    assert kept_truth.min() > 0.3, "a kept tile is mostly background"
    assert (truth[fractions < 0.5] >= 0.9).sum() == 0, "a tile that is all tissue was dropped"


def test_same_physical_grid_from_025_and_05_scans(slides):
    """Same tile positions in µm; the kept sets differ at most in tiles at the threshold's edge."""
    fine_um, fine_fr = _kept(slides.svs_025)
    coarse_um, coarse_fr = _kept(slides.tiff_05)
    np.testing.assert_allclose(fine_um, coarse_um)
    assert np.abs(fine_fr - coarse_fr).mean() < 0.03
    differ = (fine_fr >= 0.5) != (coarse_fr >= 0.5)
    assert differ.sum() <= 2
    assert (np.abs(fine_fr[differ] - 0.5) < 0.15).all()
