"""Open a whole-slide image and read regions at a physical resolution (µm/px).

Resolution is physical: callers ask for µm/px and pixels, never for a pyramid level. A region
is read from the coarsest level that is at least as fine as asked (within `MPP_TOLERANCE`),
then resized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from pathwsi.errors import PathwsiError

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.02  # a level within 2 % of the target µm/px counts as "at least as fine"
_TIFF_UNIT_UM = {"centimeter": 1e4, "inch": 25_400.0}


class SlideError(PathwsiError):
    """A slide that cannot be used; the message names the slide and what to do."""


@dataclass(frozen=True)
class Mpp:
    """Level-0 µm/px and where the value came from."""

    value: float
    source: str


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels, downsample from level 0 and µm/px."""

    index: int
    width: int
    height: int
    downsample: float
    mpp: float


MPP_DISAGREEMENT = 4.0  # a sheet µm/px this many times off the file's own is a warning


def resolve_mpp(properties: dict[str, str], override: float | None, slide_label: str) -> Mpp:
    """Level-0 µm/px: the sample sheet's override wins, then OpenSlide's, then the TIFF tags."""
    if override is not None:
        return Mpp(float(override), "sample-sheet")
    vendor = properties.get("openslide.vendor", "unknown")
    if "openslide.mpp-x" in properties:
        mpp = (
            float(properties["openslide.mpp-x"])
            + float(properties.get("openslide.mpp-y", properties["openslide.mpp-x"]))
        ) / 2
        source = "tiff-resolution" if vendor == "generic-tiff" else f"openslide-property ({vendor})"
        return Mpp(mpp, source)
    unit = _TIFF_UNIT_UM.get(properties.get("tiff.ResolutionUnit", "").lower())
    x_res = float(properties.get("tiff.XResolution", 0) or 0)
    if unit and x_res > 0:
        return Mpp(unit / x_res, "tiff-resolution")
    raise SlideError(
        f"slide {slide_label}: the file records no µm/px (no OpenSlide mpp property, no TIFF "
        "resolution tags). Add the level-0 µm/px in the sample sheet's 'mpp' column "
        "(e.g. 0.25 for a 40x scan, 0.5 for 20x)."
    )


class Slide:
    """A whole-slide image opened with OpenSlide, with its level-0 µm/px resolved."""

    def __init__(self, path: str | Path, slide_id: str | None = None, mpp_override: float | None = None):
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        self.label = f"'{self.slide_id}' ({self.path})"
        if not self.path.is_file():
            raise SlideError(f"slide {self.label}: file not found. Fix the 'path' column of the sample sheet.")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(
                f"slide {self.label}: OpenSlide cannot open it ({type(err).__name__}: {err}). The file "
                "may be truncated or corrupt (copy it again) or in a format OpenSlide does not read."
            ) from err
        self.properties = dict(self._osr.properties)
        self.mpp = resolve_mpp(self.properties, mpp_override, self.label)
        if mpp_override is not None:
            self._warn_if_far_from_the_files_mpp(float(mpp_override))
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.width, self.height = self._osr.dimensions
        self.levels = [
            Level(i, w, h, float(ds), self.mpp.value * float(ds))
            for i, ((w, h), ds) in enumerate(zip(self._osr.level_dimensions, self._osr.level_downsamples))
        ]

    def _warn_if_far_from_the_files_mpp(self, override: float) -> None:
        try:
            own = resolve_mpp(self.properties, None, self.label)
        except SlideError:
            return
        if not 1 / MPP_DISAGREEMENT <= override / own.value <= MPP_DISAGREEMENT:
            log.warning(
                "slide %s: the sample sheet's mpp %g is %.1fx the file's own %g µm/px (%s); the sheet's value is used. "
                "Check the 'mpp' column (0.25 for 40x, 0.5 for 20x) or leave it empty",
                self.label,
                override,
                override / own.value,
                own.value,
                own.source,
            )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._osr.close()

    def level_for(self, target_mpp: float) -> Level:
        """The coarsest level at least as fine as `target_mpp` (level 0 if none is)."""
        fine_enough = [lv for lv in self.levels if lv.mpp <= target_mpp * (1 + MPP_TOLERANCE)]
        return max(fine_enough, key=lambda lv: lv.mpp) if fine_enough else self.levels[0]

    def read_region(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the region at level-0 (x, y), resampled to `mpp` µm/px.

        Pixels outside the slide are white.
        """
        level = self.level_for(mpp)
        scale = mpp / level.mpp
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        try:
            region = self._osr.read_region((int(x), int(y)), level.index, size)
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"slide {self.label}: reading failed at level {level.index} ({err}); the file is "
                "probably corrupt. Copy it again, or remove its row from the sample sheet."
            ) from err
        return resize(_rgba_on_white(np.asarray(region)), width, height)

    def read_whole(self, mpp: float) -> np.ndarray:
        """The whole slide as one RGB image at `mpp` µm/px (for thumbnails and masks)."""
        width = max(1, round(self.width * self.mpp.value / mpp))
        height = max(1, round(self.height * self.mpp.value / mpp))
        return self.read_region(0, 0, width, height, mpp)

    def describe(self) -> dict:
        """JSON-ready description of the file: vendor, size, µm/px with its source, levels."""
        return {
            "vendor": self.vendor,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp.value,
            "mpp_source": self.mpp.source,
            "levels": [
                {"downsample": lv.downsample, "mpp": lv.mpp, "width": lv.width, "height": lv.height}
                for lv in self.levels
            ],
        }


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """openslide-python's (un-premultiplied) RGBA composited onto white, as RGB uint8."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    weight = alpha.astype(np.float32) / 255.0
    return np.round(rgb * weight + 255.0 * (1.0 - weight)).astype(np.uint8)


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize RGB uint8: area averaging when shrinking, bicubic when enlarging."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    shrinking = rgb.shape[1] > width
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(rgb).resize((width, height), method))
