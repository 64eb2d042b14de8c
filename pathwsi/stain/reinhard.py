"""Reinhard colour transfer (Reinhard et al., IEEE CG&A 2001) as a stain normalization: fit, target, apply.

A slide's model is the mean and standard deviation of each CIELAB channel over its sampled
tiles (`LabStats`); normalizing moves every pixel's L, a and b by the affine map that gives the
slide the target's means and deviations. The conventions are tiatoolbox's `ReinhardNormalizer`
(tiatoolbox.tools.stainnorm): OpenCV's sRGB -> LAB, statistics over every pixel of the image
(glass included), every pixel mapped, LAB clipped to its 8-bit range before going back to RGB.
Unlike tiatoolbox, nothing is rounded to 8 bits between the steps (docs/stain.md, "Methods").

numpy only, like pathwsi.stain.macenko: the apply (`apply_lab_affine`) runs on numpy here and on
torch tensors in pathwsi.stain.torch_apply. Needs no tiatoolbox.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from pathwsi.stain.lab import LAB_MAX, LAB_MIN, LabStats, constant, lab_to_rgb, rgb_to_lab
from pathwsi.stain.macenko import StainFitError, StainSettings, od_masks, require_tissue, strided

DEFAULT_LAB_REFERENCE = "reinhard_reference.json"
MIN_LAB_STD = 0.05  # a channel spread below this (in L or a/b units): a flat colour, nothing to match


def fit_reinhard(rgb: np.ndarray, settings: StainSettings | None = None) -> LabStats:
    """LAB means and standard deviations of uint8 RGB pixels (any shape ending in 3).

    Raises StainFitError when there are fewer than `min_od_pixels` tissue pixels (OD >= beta in every
    channel, as for Macenko) or a channel has no spread.
    """
    pixels = np.asarray(rgb)
    if pixels.dtype != np.uint8 or pixels.ndim < 1 or pixels.shape[-1] != 3:
        raise TypeError(f"expected uint8 RGB pixels with a last axis of 3, got {pixels.dtype} {pixels.shape}")
    return fit_pixels(np.ascontiguousarray(pixels.reshape(-1, 3).T), settings or StainSettings(min_od_pixels=3))


def fit_pixels(rgb: np.ndarray, settings: StainSettings) -> LabStats:
    """`fit_reinhard` on channel-first uint8 RGB (3, N): statistics of every pixel (strided down to
    `MAX_FIT_PIXELS`), once the sample holds enough tissue."""
    tissue, _ = od_masks(rgb, settings.io, settings.beta)
    require_tissue(tissue, settings.min_od_pixels, settings.beta)
    lab = rgb_to_lab(np, strided(rgb).astype(np.float32)).astype(np.float64)
    mean, std = lab.mean(axis=1), lab.std(axis=1)
    if np.any(std < MIN_LAB_STD):
        raise StainFitError(
            f"flat colour: LAB standard deviations {std.round(4).tolist()}, need >= {MIN_LAB_STD} in each channel"
        )
    return LabStats(mean, std)


@functools.cache
def default_lab_reference() -> LabStats:
    """The shipped default target (see pathwsi/data/reinhard_reference.json for its provenance)."""
    return LabStats.from_json(
        json.loads(resources.files("pathwsi").joinpath("data").joinpath(DEFAULT_LAB_REFERENCE).read_text())
    )


# -- applying -----------------------------------------------------------------------------------


def lab_affine(sources: LabStats | Sequence[LabStats], target: LabStats) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, shift) with LAB_normalized = scale * LAB + shift, per channel: the source's means and
    deviations become the target's. Shapes (3, 1) for one source, (B, 3, 1) for a list of sources."""
    listed = [sources] if isinstance(sources, LabStats) else list(sources)
    scale = np.stack([target.std / source.std for source in listed])[..., None]  # (B, 3, 1)
    shift = target.mean[:, None] - scale * np.stack([source.mean for source in listed])[..., None]
    if isinstance(sources, LabStats):
        scale, shift = scale[0], shift[0]
    return scale.astype(np.float32), shift.astype(np.float32)


def apply_lab_affine(xp: Any, rgb: Any, scale: Any, shift: Any) -> Any:
    """The apply math, for numpy or torch (`xp`): float32 RGB (..., 3, N) in [0, 255] -> normalized float32 RGB
    (..., 3, N) in [0, 255], not rounded. LAB is clipped to tiatoolbox's 8-bit range before going back."""
    lab = rgb_to_lab(xp, rgb) * scale + shift
    return lab_to_rgb(xp, xp.clip(lab, constant(xp, lab, LAB_MIN), constant(xp, lab, LAB_MAX)))


def normalize_lab_array(rgb: np.ndarray, source: LabStats, target: LabStats) -> np.ndarray:
    """Normalize uint8 RGB (H, W, 3) or (N, H, W, 3) from `source` to `target` statistics; uint8, same shape."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise TypeError(f"expected uint8 RGB with a last axis of 3, got {rgb.dtype} {rgb.shape}")
    pixels = rgb.reshape(-1, 3).T.astype(np.float32)
    out = apply_lab_affine(np, pixels, *lab_affine(source, target))
    return np.round(out).astype(np.uint8).T.reshape(rgb.shape)
