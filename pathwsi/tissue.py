"""Tissue mask from a low-resolution RGB thumbnail (scikit-image), in physical units.

Tissue is where saturation exceeds an Otsu threshold (clamped to a range so that faint
tissue survives on slides with strongly stained areas), minus pen ink (blue/green, strongly
saturated) and dark debris; then morphological closing, removal of small objects and
filling of small holes, all sized in µm so that the result does not depend on the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, dilation, disk, remove_small_holes, remove_small_objects


@dataclass(frozen=True)
class TissueSettings:
    """Tissue detection parameters (config section `tissue`)."""

    mask_mpp: float = 16.0
    saturation_threshold: float | None = None  # None: Otsu, clamped to [min, max] below
    min_saturation: float = 0.04
    max_saturation: float = 0.08
    dark_value: float = 0.2
    pen_hue: tuple[float, float] = (0.3, 0.64)
    pen_min_saturation: float = 0.3
    pen_margin_um: float = 32.0
    closing_um: float = 32.0
    min_region_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask at `mpp` µm/px and the threshold that made it."""

    mask: np.ndarray
    mpp: float
    saturation_threshold: float

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp**2 / 1e6


def detect_tissue(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()) -> TissueMask:
    """Tissue mask of an RGB uint8 thumbnail taken at `mpp` µm/px."""
    hsv = rgb2hsv(rgb)
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    threshold = _saturation_threshold(saturation, settings)
    candidate = saturation > threshold
    pen = (hue >= settings.pen_hue[0]) & (hue <= settings.pen_hue[1]) & (saturation >= settings.pen_min_saturation)
    artefact = pen | (value < settings.dark_value)
    margin_px = settings.pen_margin_um / mpp
    if artefact.any() and margin_px >= 1:
        artefact = dilation(artefact, disk(round(margin_px)))
    mask = candidate & ~artefact
    radius = round(settings.closing_um / mpp)
    if radius >= 1:
        mask = closing(mask, disk(radius))
    px_area = mpp * mpp
    mask = remove_small_objects(mask, max_size=int(settings.min_region_um2 / px_area))
    mask = remove_small_holes(mask, max_size=int(settings.max_hole_um2 / px_area))
    return TissueMask(mask & ~artefact, mpp, float(threshold))


def _saturation_threshold(saturation: np.ndarray, settings: TissueSettings) -> float:
    """The configured threshold, or Otsu's clamped to [min_saturation, max_saturation]."""
    if settings.saturation_threshold is not None:
        return settings.saturation_threshold
    if np.ptp(saturation) == 0:
        return settings.max_saturation
    otsu = float(threshold_otsu(saturation))
    return min(max(otsu, settings.min_saturation), settings.max_saturation)
