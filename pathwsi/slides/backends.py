"""The libraries that open a slide: OpenSlide (the default) and tiatoolbox's WSIReader (the `tiatoolbox` extra).

`open_backend(path, choice)` gives a `SlideBackend`: the pyramid's levels, the properties, the file's own
µm/px with its source, and level reads as RGB(A) uint8. `choice` is `tiling.backend`:

- `openslide`: OpenSlide only (Aperio SVS, generic tiled TIFF, NDPI, MRXS, DICOM, ...);
- `tiatoolbox`: tiatoolbox's WSIReader (OME-TIFF and QPTIFF through tifffile, DICOM-WSI series through
  wsidicom, OME-NGFF Zarr, and OpenSlide's formats through OpenSlide);
- `auto` (default): OpenSlide, except for an OME-TIFF (OpenSlide sees only its first image, not the
  pyramid in its sub-images) or a file or folder OpenSlide cannot open, which go to tiatoolbox when the
  extra is installed.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile

from pathwsi.errors import INSTALL_TIATOOLBOX, PathwsiError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "openslide", "tiatoolbox")
_TIFF_UNIT_UM = {"centimeter": 1e4, "inch": 25_400.0}


class BackendError(PathwsiError):
    """A slide that no configured library can open; the message says which were tried and what to do."""


class SlideBackend(ABC):
    """One opened slide file."""

    name: str
    vendor: str
    properties: dict[str, str]
    dimensions: tuple[int, int]
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    @abstractmethod
    def read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB or RGBA uint8 (height, width, channels) of `level` from level-0 (x, y); white outside the image."""

    @abstractmethod
    def own_mpp(self) -> tuple[float, str] | None:
        """The file's level-0 µm/px and where it comes from, or None when the file records none."""

    @abstractmethod
    def close(self) -> None: ...


class OpenSlideBackend(SlideBackend):
    name = "openslide"

    def __init__(self, path: Path):
        self._osr = openslide.OpenSlide(str(path))
        self.properties = dict(self._osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.dimensions = self._osr.dimensions
        self.level_dimensions = list(self._osr.level_dimensions)
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]

    def read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return np.asarray(self._osr.read_region((x, y), level, (width, height)))

    def own_mpp(self) -> tuple[float, str] | None:
        return openslide_mpp(self.properties)

    def close(self) -> None:
        self._osr.close()


class TiatoolboxBackend(SlideBackend):
    name = "tiatoolbox"

    def __init__(self, path: Path):
        from tiatoolbox.wsicore.wsireader import DICOMWSIReader, WSIReader, is_dicom

        if is_dicom(path):  # WSIReader.open fails on a folder without a suffix; a .dcm file stands for its folder
            self._reader: Any = DICOMWSIReader(path if path.is_dir() else path.parent)
        else:
            self._reader = WSIReader.open(path)
        info = self._reader.info
        self.vendor = f"tiatoolbox-{type(self._reader).__name__}"
        self.properties = {"tiatoolbox.reader": type(self._reader).__name__, "tiatoolbox.vendor": str(info.vendor)}
        self.dimensions = tuple(int(v) for v in info.slide_dimensions)  # type: ignore[assignment]
        self.level_dimensions = [(int(w), int(h)) for w, h in info.level_dimensions]
        width, height = self.dimensions  # downsamples as OpenSlide computes them: the mean of the two axes' ratios
        self.level_downsamples = [(width / w + height / h) / 2 for w, h in self.level_dimensions]
        self._mpp = info.mpp

    def read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        region = self._reader.read_rect(
            (x, y), (width, height), resolution=level, units="level", pad_constant_values=255, coord_space="baseline"
        )
        return np.ascontiguousarray(np.asarray(region, dtype=np.uint8)[..., :4])

    def own_mpp(self) -> tuple[float, str] | None:
        if self._mpp is None:
            return None
        return float(np.mean(self._mpp)), f"tiatoolbox-metadata ({self.properties['tiatoolbox.reader']})"

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if callable(close):
            close()


def openslide_mpp(properties: dict[str, str]) -> tuple[float, str] | None:
    """Level-0 µm/px from OpenSlide's properties: its mpp-x/y, else the TIFF resolution tags; None if neither."""
    vendor = properties.get("openslide.vendor", "unknown")
    if "openslide.mpp-x" in properties:
        mpp_x = float(properties["openslide.mpp-x"])
        mpp = (mpp_x + float(properties.get("openslide.mpp-y", mpp_x))) / 2
        return mpp, "tiff-resolution" if vendor == "generic-tiff" else f"openslide-property ({vendor})"
    unit = _TIFF_UNIT_UM.get(properties.get("tiff.ResolutionUnit", "").lower())
    x_res = float(properties.get("tiff.XResolution", 0) or 0)
    return (unit / x_res, "tiff-resolution") if unit and x_res > 0 else None


def tiatoolbox_installed() -> bool:
    return importlib.util.find_spec("tiatoolbox") is not None


def is_ome_tiff(path: Path) -> bool:
    """A TIFF whose first ImageDescription is OME-XML."""
    if not path.is_file() or path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tiff:
            return bool(tiff.is_ome)
    except (tifffile.TiffFileError, OSError):
        return False


def open_backend(path: Path, choice: str, label: str) -> SlideBackend:
    """The backend `choice` (auto, openslide, tiatoolbox) opens `path` with; BackendError says why none could."""
    if choice not in BACKENDS:
        raise BackendError(
            f"slide {label}: backend '{choice}' (tiling.backend or the sheet's backend column) is not one of {', '.join(BACKENDS)}"
        )
    ome = choice == "auto" and is_ome_tiff(path)
    if choice == "tiatoolbox" or (ome and tiatoolbox_installed()):
        return _tiatoolbox(path, label)
    if ome:
        log.warning(
            "slide %s is an OME-TIFF: OpenSlide reads only its full-resolution image, not its pyramid, so every "
            "overview is computed from level 0 (slow, memory-hungry). For its pyramid: %s",
            label,
            INSTALL_TIATOOLBOX,
        )
    try:
        return OpenSlideBackend(path)
    except (openslide.OpenSlideError, OSError) as err:
        refused = f"OpenSlide cannot open it ({type(err).__name__}: {err})"
        if choice == "auto" and tiatoolbox_installed():
            try:
                return _tiatoolbox(path, label)
            except BackendError as tia:
                raise BackendError(f"{tia}; {refused}") from err
        extra = "" if tiatoolbox_installed() else f" For OME-TIFF or DICOM-WSI slides: {INSTALL_TIATOOLBOX}."
        raise BackendError(
            f"slide {label}: {refused}. The file may be truncated or corrupt (copy it again) or in a format OpenSlide "
            f"does not read.{extra}"
        ) from err


def _tiatoolbox(path: Path, label: str) -> TiatoolboxBackend:
    if not tiatoolbox_installed():
        raise BackendError(
            f"slide {label}: backend tiatoolbox (tiling.backend or the sheet's backend column) needs the tiatoolbox extra: {INSTALL_TIATOOLBOX}"
        )
    try:
        return TiatoolboxBackend(path)
    except Exception as err:  # tiatoolbox raises bare ValueErrors, FileNotFoundErrors, ... for files it cannot read
        raise BackendError(f"slide {label}: tiatoolbox cannot open it ({type(err).__name__}: {err})") from err
