"""`stain.method` dispatch for the numpy side (the tiling job, targets, the QC picture): which fit, which
default target, which apply. The torch side's dispatcher is `pathwsi.stain.torch_apply.normalize_tiles`.

- macenko (default): pathwsi.stain.macenko;
- vahadane: sparse non-negative stain vectors (pathwsi.stain.vahadane) in Macenko's model: same checks, same apply;
- reinhard: LAB channel statistics (pathwsi.stain.reinhard).

No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pathwsi.stain import macenko, reinhard, vahadane
from pathwsi.stain.lab import LabStats
from pathwsi.stain.macenko import (
    PixelFit,
    StainFit,
    StainModel,
    StainParams,
    StainSettings,
    default_reference,
    fit_slide_with,
    load_target_with,
    model_from_json,
)

PIXEL_FITS: dict[str, PixelFit] = {
    "macenko": macenko.fit_pixels,
    "vahadane": vahadane.fit_pixels,
    "reinhard": reinhard.fit_pixels,
}


def default_target(method: str) -> StainModel:
    """The shipped default target of `method`: Macenko's reference stains, or Reinhard's LAB statistics."""
    return reinhard.default_lab_reference() if method == "reinhard" else default_reference()


def fit_slide(tiles: Sequence[np.ndarray] | np.ndarray, settings: StainSettings, target: StainModel) -> StainFit:
    """A slide's fit with `settings.method` from its sampled tiles, with the fallback; never raises on pixels."""
    _check_kind(target, settings.method)
    return fit_slide_with(PIXEL_FITS[settings.method], tiles, settings, target, default_target(settings.method))


def load_target(settings: StainSettings) -> StainModel:
    """The target of `settings.method`: its shipped default, a params .json, or a target image fitted with it."""
    method = settings.method
    return load_target_with(settings, default_target(method), model_from_json(method), PIXEL_FITS[method])


def normalize_rgb(rgb: np.ndarray, fit: StainFit) -> np.ndarray:
    """uint8 RGB (H, W, 3) or (N, H, W, 3) normalized with a slide's fit (numpy: the QC picture)."""
    source, target = fit.params, fit.target
    if isinstance(source, LabStats) and isinstance(target, LabStats):
        return reinhard.normalize_lab_array(rgb, source, target)
    if isinstance(source, StainParams) and isinstance(target, StainParams):
        return macenko.normalize_array(rgb, source, target, fit.settings.io, fit.settings.beta)
    raise TypeError(f"a {fit.method} fit holds {type(source).__name__} -> {type(target).__name__}")


def _check_kind(target: StainModel, method: str) -> None:
    want = LabStats if method == "reinhard" else StainParams
    if not isinstance(target, want):
        raise TypeError(f"stain.method {method} needs a {want.__name__} target, got {type(target).__name__}")
