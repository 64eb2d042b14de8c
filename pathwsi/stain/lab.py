"""sRGB <-> CIELAB, written once over an array namespace (numpy, or torch on any device), and the
LAB channel statistics that Reinhard's method (pathwsi.stain.reinhard) fits and matches.

The formulas and constants are OpenCV's (`cv2.cvtColor` with COLOR_RGB2LAB / COLOR_LAB2RGB, the
conversion tiatoolbox's Reinhard normalizer uses): sRGB gamma, the sRGB -> XYZ matrix, the D65
white point (0.950456, 1, 1.088754) and the CIE f() with its linear part below (6/29)^3. Unlike
OpenCV's 8-bit path, nothing is rounded to 8 bits in between: L is in [0, 100] and a, b are
centred on 0 (tiatoolbox's scale after its `lab_split`), all float32.

Arrays are channel-first: channels on axis -2 (R, G, B or L, a, b), pixels on the last axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SRGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
XYZ_TO_SRGB = np.array(
    [[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556], [0.055648, -0.204043, 1.057311]]
)
WHITE_D65 = np.array([0.950456, 1.0, 1.088754])
_T0 = 0.008856  # CIE: f(t) = t^(1/3) above this, 7.787 t + 16/116 below
_F0 = _T0 ** (1 / 3)
_LINEAR_OFFSET = 16 / 116
# (fX, fY, fZ) -> (L, a, b) is linear: L = 116 fY - 16, a = 500 (fX - fY), b = 200 (fY - fZ)
F_TO_LAB = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
LAB_OFFSET = np.array([[-16.0], [0.0], [0.0]])
# tiatoolbox stores LAB as 8 bits (L * 2.55, a + 128, b + 128) and clips there: these are the same bounds
LAB_MIN = np.array([[0.0], [-128.0], [-128.0]])
LAB_MAX = np.array([[100.0], [127.0], [127.0]])


def constant(xp: Any, like: Any, array: np.ndarray) -> Any:
    """A numpy constant as float32 in `xp`, on the device of `like` (torch)."""
    if xp is np:
        return array.astype(np.float32)
    return xp.as_tensor(array, dtype=xp.float32, device=like.device)


def rgb_to_lab(xp: Any, rgb: Any) -> Any:
    """float32 RGB (..., 3, N) in [0, 255] -> CIELAB (..., 3, N): L in [0, 100], a and b around 0."""
    c = rgb * (1 / 255)
    linear = xp.where(c <= 0.04045, c * (1 / 12.92), ((c + 0.055) * (1 / 1.055)) ** 2.4)
    t = constant(xp, rgb, SRGB_TO_XYZ / WHITE_D65[:, None]) @ linear  # XYZ relative to the white point
    f = xp.where(t > _T0, xp.clip(t, _T0, None) ** (1 / 3), t * 7.787 + _LINEAR_OFFSET)
    return constant(xp, rgb, F_TO_LAB) @ f + constant(xp, rgb, LAB_OFFSET)


def lab_to_rgb(xp: Any, lab: Any) -> Any:
    """CIELAB (..., 3, N) -> float32 RGB (..., 3, N) clipped to [0, 255] (not rounded)."""
    f = constant(xp, lab, np.linalg.inv(F_TO_LAB)) @ (lab - constant(xp, lab, LAB_OFFSET))
    t = xp.where(f > _F0, f**3, (f - _LINEAR_OFFSET) * (1 / 7.787))
    linear = constant(xp, lab, XYZ_TO_SRGB * WHITE_D65[None, :]) @ t
    c = xp.where(linear <= 0.0031308, linear * 12.92, xp.clip(linear, 0.0031308, None) ** (1 / 2.4) * 1.055 - 0.055)
    return xp.clip(c * 255, 0.0, 255.0)


@dataclass(frozen=True, eq=False)
class LabStats:
    """Per-channel mean and standard deviation of CIELAB (L in [0, 100], a and b around 0): Reinhard's model."""

    mean: np.ndarray  # (3,) float64: L, a, b
    std: np.ndarray  # (3,) float64, > 0

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64).reshape(3)
        std = np.array(self.std, dtype=np.float64).reshape(3)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError(f"LAB statistics must be finite with positive spreads, got mean {mean}, std {std}")
        mean.setflags(write=False)
        std.setflags(write=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: {"lab_mean": [L, a, b], "lab_std": [L, a, b]}."""
        return {"lab_mean": self.mean.round(6).tolist(), "lab_std": self.std.round(6).tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabStats:
        """Inverse of `to_json`; other keys (provenance notes) are ignored."""
        return cls(np.asarray(data["lab_mean"], dtype=np.float64), np.asarray(data["lab_std"], dtype=np.float64))
