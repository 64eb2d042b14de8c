"""Tissue masks against the synthetic ground truth: background, faint tissue, pen and debris."""

from __future__ import annotations

import numpy as np
import pytest

from pathwsi.demo.slides import SyntheticTissue
from pathwsi.slides.tissue_mask import TissueSettings, detect_tissue

MPP = 16.0


def truth(tissue: SyntheticTissue, shape: tuple[int, int], mpp: float = MPP) -> np.ndarray:
    ys = (np.arange(shape[0]) + 0.5) * mpp
    xs = (np.arange(shape[1]) + 0.5) * mpp
    gx, gy = np.meshgrid(xs, ys)
    return tissue.tissue_field(gx, gy) > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("faint, pen", [(False, False), (True, False), (False, True), (True, True)])
def test_mask_matches_the_true_tissue(faint, pen):
    tissue = SyntheticTissue(4000.0, 3000.0, seed=5, faint=faint, pen=pen)
    thumb = tissue.render(0, 0, 250, 188, MPP)
    mask = detect_tissue(thumb, MPP).mask
    expected = truth(tissue, mask.shape)
    assert iou(mask, expected) > 0.85


def test_faint_tissue_is_kept():
    tissue = SyntheticTissue(4000.0, 3000.0, seed=5, faint=True)
    thumb = tissue.render(0, 0, 250, 188, MPP)
    mask = detect_tissue(thumb, MPP).mask
    expected = truth(tissue, mask.shape)
    gx, gy = np.meshgrid((np.arange(250) + 0.5) * MPP, (np.arange(188) + 0.5) * MPP)
    from pathwsi.demo.slides import _value_noise

    faint = expected & (_value_noise(gx, gy, 600.0, tissue.seed, 4) > 0.15)
    assert faint.sum() > 200, "the fixture must contain faint tissue"
    assert mask[faint].mean() > 0.8


def test_pen_and_debris_are_not_tissue():
    tissue = SyntheticTissue(4000.0, 3000.0, seed=5, pen=True)
    thumb = tissue.render(0, 0, 250, 188, MPP)
    mask = detect_tissue(thumb, MPP).mask
    ys, xs = np.mgrid[0:188, 0:250]
    start, end = tissue.pen_path()
    band = np.abs((xs + 0.5) * MPP - (start[0] + end[0]) / 2) < 60  # the stroke's column
    assert band.sum() > 0 and not mask[band].any()
    dark = thumb.max(axis=2) < 80  # debris specks
    assert dark.sum() > 0 and not mask[dark].any()


@pytest.mark.parametrize("value", [255, 240, 0])
def test_uniform_images_have_no_tissue(value):
    image = np.full((100, 120, 3), value, np.uint8)
    assert not detect_tissue(image, MPP).mask.any()


def test_fixed_threshold_overrides_otsu():
    tissue = SyntheticTissue(4000.0, 3000.0, seed=5)
    thumb = tissue.render(0, 0, 250, 188, MPP)
    result = detect_tissue(thumb, MPP, TissueSettings(saturation_threshold=0.9))
    assert result.saturation_threshold == 0.9 and not result.mask.any()


def test_mask_is_consistent_across_mask_resolutions():
    tissue = SyntheticTissue(4000.0, 3000.0, seed=7)
    coarse = detect_tissue(tissue.render(0, 0, 250, 188, 16.0), 16.0, TissueSettings(mask_mpp=16.0)).area_mm2
    fine = detect_tissue(tissue.render(0, 0, 500, 375, 8.0), 8.0, TissueSettings(mask_mpp=8.0)).area_mm2
    assert fine == pytest.approx(coarse, rel=0.05)


def test_hsv_and_otsu_agree_with_scikit_image():
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    from pathwsi.slides.tissue_mask import hsv, otsu_threshold

    image = SyntheticTissue(2000.0, 1500.0, seed=9, pen=True).render(0, 0, 200, 150, 10.0)
    image[:5, :5] = [0, 0, 0]
    image[5:10, :5] = [255, 255, 255]
    ours = np.stack(hsv(image), axis=-1)
    np.testing.assert_allclose(ours, rgb2hsv(image), atol=1e-5)
    saturation = ours[..., 1]
    assert otsu_threshold(saturation) == pytest.approx(threshold_otsu(saturation), abs=1e-6)
