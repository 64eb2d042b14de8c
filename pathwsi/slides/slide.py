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
from pathwsi.slides.backends import BackendError, open_backend

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.02  # a level within 2 % of the target µm/px counts as "at least as fine"


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


def resolve_mpp(own: tuple[float, str] | None, override: float | None, slide_label: str) -> Mpp:
    """Level-0 µm/px: the sample sheet's override wins, then the file's own (`SlideBackend.own_mpp`)."""
    if override is not None:
        return Mpp(float(override), "sample-sheet")
    if own is not None:
        return Mpp(*own)
    raise SlideError(
        f"slide {slide_label}: the file records no µm/px (no OpenSlide mpp property, no TIFF "
        "resolution tags, no metadata tiatoolbox reads). Add the level-0 µm/px in the sample sheet's 'mpp' column "
        "(e.g. 0.25 for a 40x scan, 0.5 for 20x)."
    )


class Slide:
    """A whole-slide image opened with OpenSlide or tiatoolbox (`pathwsi.slides.backends`), with its level-0 µm/px
    resolved."""

    def __init__(
        self, path: str | Path, slide_id: str | None = None, mpp_override: float | None = None, backend: str = "auto"
    ):
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        self.label = f"'{self.slide_id}' ({self.path})"
        if not self.path.exists():
            raise SlideError(f"slide {self.label}: file not found. Fix the 'path' column of the sample sheet.")
        try:
            self._backend = open_backend(self.path, backend, self.label)
        except BackendError as err:
            raise SlideError(str(err)) from err
        self.backend = self._backend.name
        self.properties = self._backend.properties
        self.mpp = resolve_mpp(self._backend.own_mpp(), mpp_override, self.label)
        if mpp_override is not None:
            self._warn_if_far_from_the_files_mpp(float(mpp_override))
        self.vendor = self._backend.vendor
        self.width, self.height = self._backend.dimensions
        self.levels = [
            Level(i, w, h, ds, self.mpp.value * ds)
            for i, ((w, h), ds) in enumerate(zip(self._backend.level_dimensions, self._backend.level_downsamples))
        ]

    def _warn_if_far_from_the_files_mpp(self, override: float) -> None:
        try:
            own = resolve_mpp(self._backend.own_mpp(), None, self.label)
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
        self._backend.close()

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
            region = self._backend.read_level(int(x), int(y), level.index, *size)
        except (openslide.OpenSlideError, ValueError, OSError) as err:
            raise SlideError(
                f"slide {self.label}: reading failed at level {level.index} ({err}); the file is "
                "probably corrupt. Copy it again, or remove its row from the sample sheet."
            ) from err
        return resize(_rgba_on_white(region), width, height)

    def read_whole(self, mpp: float) -> np.ndarray:
        """The whole slide as one RGB image at `mpp` µm/px (for thumbnails and masks)."""
        width = max(1, round(self.width * self.mpp.value / mpp))
        height = max(1, round(self.height * self.mpp.value / mpp))
        return self.read_region(0, 0, width, height, mpp)

    def describe(self) -> dict:
        """JSON-ready description of the file: vendor, size, µm/px with its source, levels."""
        return {
            "backend": self.backend,
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
    """openslide-python's (un-premultiplied) RGBA composited onto white, as RGB uint8 (RGB passes through)."""
    rgb = rgba[..., :3]
    if rgba.shape[-1] == 3:
        return np.ascontiguousarray(rgb)
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
