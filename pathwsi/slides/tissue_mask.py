"""Tissue mask from a low-resolution RGB thumbnail (scikit-image), in physical units.

Tissue is where HSV saturation exceeds an Otsu threshold (clamped to a range so that faint
tissue survives on slides with strongly stained areas), minus pen ink (blue/green, strongly
saturated) and dark debris; then morphological closing, removal of small objects and
filling of small holes, all sized in µm so that the result does not depend on the scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
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

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TissueSettings:
        """From a validated config's `tissue` section."""
        return cls(**dict(config["tissue"], pen_hue=tuple(config["tissue"]["pen_hue"])))


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
    hue, saturation, value = hsv(rgb)
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
    return min(max(otsu_threshold(saturation), settings.min_saturation), settings.max_saturation)


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation and value in [0, 1] of an RGB uint8 image (float32; as skimage's rgb2hsv)."""
    rgb = rgb.astype(np.float32) / 255.0
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(
        value == red,
        ((green - blue) / safe) % 6.0,
        np.where(value == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    return np.where(chroma > 0, hue / 6.0, 0.0).astype(np.float32), saturation, value


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of `values` from a `bins`-bin histogram (as skimage.filters.threshold_otsu)."""
    counts, edges = np.histogram(values.ravel(), bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = np.cumsum(counts[::-1])[::-1]
    mean_low = np.cumsum(counts * centers) / np.maximum(weight_low, 1)
    mean_high = (np.cumsum((counts * centers)[::-1]) / np.maximum(np.cumsum(counts[::-1]), 1))[::-1]
    between = weight_low[:-1] * weight_high[1:] * (mean_low[:-1] - mean_high[1:]) ** 2
    return float(centers[np.argmax(between)])
