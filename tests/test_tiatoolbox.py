"""The tiatoolbox backend (the `tiatoolbox` extra): an OME-TIFF and a DICOM-WSI series that the tests write go
through the same reads, tiling and extraction as the SVS they were made from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from slide_formats import write_dicom, write_ome_tiff

from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.features.extract import ExtractSettings, extract_slide
from pathwsi.features.store import open_store
from pathwsi.samples import Sample
from pathwsi.slides.slide import Slide
from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide
from pathwsi.slides.tile_record import TilesRecord

pytest.importorskip("tiatoolbox")
pytest.importorskip("wsidicomizer")
pytestmark = pytest.mark.filterwarnings("ignore")  # tiatoolbox and wsidicom warn on import and on metadata
SPECS = [ModelSpec("small", arch="test_resnet", input_px=64, seed=1)]


@pytest.fixture(scope="module")
def formats(slides, tmp_path_factory) -> dict[str, Path]:
    """The 0.25 µm/px test SVS, and the same section as an OME-TIFF (same pixels) and as DICOM-WSI (re-encoded)."""
    folder = tmp_path_factory.mktemp("formats")
    return {
        "svs": slides.svs_025,
        "ome": write_ome_tiff(slides.svs_025, folder / "section.ome.tif", 0.25),
        "dicom": write_dicom(slides.svs_025, folder / "dicom"),
    }


def grid_tiles(slide: Slide, step: int = 7) -> np.ndarray:
    """Every `step`-th 224-px tile at 0.5 µm/px of a coarse grid over the slide."""
    corners = [(x, y) for y in range(0, slide.height - 448, 448) for x in range(0, slide.width - 448, 448)]
    return np.stack([slide.read_region(x, y, 224, 224, 0.5) for x, y in corners[::step]])


def test_an_ome_tiff_opens_with_tiatoolbox_and_gives_the_svs_pixels(formats):
    with Slide(formats["svs"], backend="openslide") as svs, Slide(formats["ome"]) as ome:
        assert ome.backend == "tiatoolbox" and ome.vendor == "tiatoolbox-TIFFWSIReader"  # auto: OME-TIFF
        assert ome.mpp.value == pytest.approx(0.25) and ome.mpp.source.startswith("tiatoolbox-metadata")
        assert [lv.width for lv in ome.levels] == [lv.width for lv in svs.levels]
        np.testing.assert_array_equal(grid_tiles(ome), grid_tiles(svs))
        np.testing.assert_array_equal(ome.read_whole(16.0), svs.read_whole(16.0))  # the tissue mask's input
    with Slide(formats["ome"], backend="openslide") as flat:
        assert len(flat.levels) == 1  # OpenSlide sees the first image only, not the pyramid


def test_a_dicom_series_reads_as_openslide_reads_it(formats):
    folder = formats["dicom"]
    with Slide(folder) as dicom, Slide(sorted(folder.glob("*.dcm"))[0], backend="openslide") as reference:
        assert dicom.backend == "tiatoolbox" and reference.vendor == "dicom"  # auto: OpenSlide cannot open a folder
        assert dicom.mpp.value == pytest.approx(0.25) and len(dicom.levels) == len(reference.levels) >= 3
        np.testing.assert_array_equal(grid_tiles(dicom), grid_tiles(reference))


@pytest.mark.parametrize("fmt", ["ome", "dicom"])
def test_tiling_and_extraction_go_as_through_openslide(formats, tmp_path, fmt):
    """Tiled through tiatoolbox like any slide; its features equal those of the same tiles read by OpenSlide
    (the SVS for the OME-TIFF; for the DICOM-WSI folder one of its .dcm files, which OpenSlide opens but whose
    coarse level it cannot read: 'Dimensional mismatch reading JPEG' on a partial edge frame)."""
    sample = Sample("c", fmt, "p", str(formats[fmt]))
    outputs = TilingOutputs.under(tmp_path, fmt)
    assert tile_slide(sample, TilingJobSettings(), outputs).status == "ok"
    record = TilesRecord.load(outputs.meta)
    assert record.slide is not None and record.slide["backend"] == "tiatoolbox" and record.kept > 10
    table = pq.read_table(outputs.tiles)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    fractions = table.column("tissue_fraction").to_numpy()
    reference = formats["svs"] if fmt == "ome" else sorted(formats["dicom"].glob("*.dcm"))[0]
    settings = ExtractSettings(batch_size=8, chunk_tiles=16, num_workers=0, reader="exact", dtype="float32")
    features = {}
    for name, path in (("tiatoolbox", formats[fmt]), ("openslide", reference)):
        models = [build_backbone(spec) for spec in SPECS]
        store = tmp_path / f"{name}.zarr"
        tiled_with = replace(record, slide={**record.slide, "backend": name})  # extraction opens it as tiling did
        extract_slide(replace(sample, path=str(path)), coords, fractions, tiled_with, models, settings, store)
        assert open_store(store).attrs.get("backend", "openslide") == name
        features[name] = open_store(store).features("small")[:]
    np.testing.assert_array_equal(features["tiatoolbox"], features["openslide"])
    if fmt == "ome":  # the same pixels as the SVS: the same tiles and stain fit as tiling the SVS
        svs = tile_slide(
            Sample("c", "svs", "p", str(formats["svs"])), TilingJobSettings(), TilingOutputs.under(tmp_path, "svs")
        )
        assert (
            svs.kept == record.kept
            and TilesRecord.load(TilingOutputs.under(tmp_path, "svs").meta).stain_json() == record.stain_json()
        )


def test_a_backend_chosen_in_the_sheet_is_used_by_tiling_and_extraction(formats, tmp_path):
    """The sheet's `backend` column forces tiatoolbox on an SVS; the feature job reads with what tiling used."""
    sample = Sample("c", "svs", "p", str(formats["svs"]), backend="tiatoolbox")
    outputs = TilingOutputs.under(tmp_path, "svs")
    tile_slide(sample, TilingJobSettings(), outputs)
    record = TilesRecord.load(outputs.meta)
    assert record.slide is not None and record.slide["backend"] == "tiatoolbox"
    table = pq.read_table(outputs.tiles)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)[:8]
    settings = ExtractSettings(batch_size=8, chunk_tiles=8, num_workers=0, reader="fast", dtype="float32")
    store = tmp_path / "svs.zarr"
    extract_slide(
        replace(sample, backend=None), coords, np.ones(8), record, [build_backbone(SPECS[0])], settings, store
    )
    assert open_store(store).attrs["backend"] == "tiatoolbox"


def test_a_forced_backend_is_used(formats):
    with Slide(formats["svs"], backend="tiatoolbox") as slide:
        assert slide.backend == "tiatoolbox" and slide.vendor == "tiatoolbox-OpenSlideWSIReader"
    with pytest.raises(Exception, match="backend 'bioformats' \\(tiling.backend or the sheet's backend column\\)"):
        Slide(formats["svs"], backend="bioformats")
