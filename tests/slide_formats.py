"""Slides in formats OpenSlide reads poorly or not at all, written by the tests from a synthetic SVS: an OME-TIFF
(tifffile, the SVS's decoded pyramid stored losslessly: the same pixels) and a DICOM-WSI series (wsidicom, through
wsidicomizer; its tiles are re-encoded, and OpenSlide also reads the series, from any of its .dcm files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def write_ome_tiff(svs: Path, out: Path, mpp: float) -> Path:
    """The SVS's pyramid levels, decoded, as a zlib-compressed tiled OME-TIFF (levels in sub-images) at `mpp`."""
    assert out.name.endswith((".ome.tif", ".ome.tiff")), "tiatoolbox recognises OME-TIFF by its suffix"
    with tifffile.TiffFile(svs) as tiff:
        levels = [np.asarray(page.asarray()) for page in tiff.pages if page.is_tiled]  # the pyramid; not the thumbnail
    options = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(out, ome=True) as writer:
        writer.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm",
            },
            **options,
        )
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)
    return out


def write_dicom(svs: Path, folder: Path) -> Path:
    """A DICOM-WSI series of the SVS (levels 1, 2, 4, ...) written by wsidicom through wsidicomizer."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.sources import TiffSlideSource

    folder.mkdir(parents=True, exist_ok=True)
    WsiDicomizer.convert(
        svs,
        folder,
        preferred_source=TiffSlideSource,
        add_missing_levels=True,
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
    )
    return folder
