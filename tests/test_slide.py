"""Reading slides: µm/px and its source, level choice, regions at a physical resolution."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from pathwsi.slides.backends import openslide_mpp
from pathwsi.slides.slide import Slide, SlideError, resolve_mpp


def test_mpp_comes_from_the_file_and_names_its_source(slides):
    with Slide(slides.svs_025) as svs, Slide(slides.tiff_05) as tiff:
        assert svs.mpp.value == pytest.approx(0.25) and svs.mpp.source == "openslide-property (aperio)"
        assert tiff.mpp.value == pytest.approx(0.5) and tiff.mpp.source == "tiff-resolution"


def test_sample_sheet_mpp_wins_over_the_file(slides):
    with Slide(slides.svs_025, mpp_override=0.2527) as slide:
        assert slide.mpp.value == 0.2527 and slide.mpp.source == "sample-sheet"
        assert slide.levels[1].mpp == pytest.approx(0.2527 * 4)


def test_missing_mpp_is_an_error_naming_the_slide_and_the_fix(slides):
    with pytest.raises(SlideError, match=r"'no_mpp'.*sample sheet's 'mpp' column"):
        Slide(slides.no_mpp, "no_mpp")
    with Slide(slides.no_mpp, "no_mpp", mpp_override=0.5) as slide:
        assert slide.mpp.source == "sample-sheet"


def test_tiff_resolution_tags_are_used_when_openslide_reports_no_mpp():
    props = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}
    mpp = resolve_mpp(openslide_mpp(props), None, "x")
    assert mpp.value == pytest.approx(0.25) and mpp.source == "tiff-resolution"


@pytest.mark.parametrize(
    "name, pattern",
    [("corrupt", "OpenSlide cannot open it|reading failed"), ("not_a_slide", "OpenSlide cannot open it")],
)
def test_unreadable_files_raise_slide_error(slides, name, pattern):
    with pytest.raises(SlideError, match=pattern):
        with Slide(getattr(slides, name)) as slide:
            slide.read_whole(1.0)  # a file cut short may open, then fail on reading


def test_missing_file_raises_slide_error(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        Slide(tmp_path / "gone.svs")


def test_level_choice_is_the_coarsest_at_least_as_fine(slides):
    with Slide(slides.svs_025) as slide:  # levels at 0.25, 1.0, 4.0 µm/px
        assert slide.level_for(0.5).index == 0
        assert slide.level_for(1.0).index == 1
        assert slide.level_for(1.01).index == 1  # within tolerance
        assert slide.level_for(3.9).index == 1
        assert slide.level_for(16.0).index == 2
        assert slide.level_for(0.1).index == 0  # nothing finer: level 0, enlarged


def test_region_at_half_resolution_equals_a_direct_resize_of_level0(slides):
    with Slide(slides.svs_025) as slide:
        region = slide.read_region(1200, 800, 224, 224, 0.5)
    direct = openslide.OpenSlide(str(slides.svs_025)).read_region((1200, 800), 0, (448, 448)).convert("RGB")
    expected = np.asarray(direct.resize((224, 224), Image.Resampling.BOX))
    assert region.shape == (224, 224, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, expected)


def test_same_tissue_read_from_two_scans_agrees(slides):
    """0.5 µm/px from the 0.25 scan (level 0, halved) vs the 0.5 scan read natively."""
    with Slide(slides.svs_025) as fine, Slide(slides.tiff_05) as coarse:
        x_um, y_um = 300.0, 200.0
        from_fine = fine.read_region(round(x_um / 0.25), round(y_um / 0.25), 224, 224, 0.5).astype(float)
        from_coarse = coarse.read_region(round(x_um / 0.5), round(y_um / 0.5), 224, 224, 0.5).astype(float)
    rendered = slides.tissue.render(x_um, y_um, 224, 224, 0.5).astype(float)
    assert np.abs(from_fine - from_coarse).mean() < 8
    assert np.abs(from_coarse - rendered).mean() < 6


def test_region_from_a_coarser_level_matches_level0_downsampled(slides):
    with Slide(slides.svs_025) as slide:
        from_level1 = slide.read_region(400, 400, 100, 100, 2.0).astype(float)  # read from the 1 µm/px level
        level0 = np.asarray(
            openslide.OpenSlide(str(slides.svs_025)).read_region((400, 400), 0, (800, 800)).convert("RGB")
        )
    expected = np.asarray(Image.fromarray(level0).resize((100, 100), Image.Resampling.BOX)).astype(float)
    assert np.abs(from_level1 - expected).mean() < 4


def test_pixels_outside_the_slide_are_white(slides):
    with Slide(slides.tiff_05) as slide:
        region = slide.read_region(slide.width - 10, slide.height - 10, 40, 40, 0.5)
    assert (region[20:, 20:] == 255).all()


def test_a_sheet_mpp_far_from_the_files_own_is_a_warning_naming_the_slide(slides, caplog):
    with caplog.at_level("WARNING"):
        with Slide(slides.svs_025, "far", mpp_override=1.5) as slide:
            assert slide.mpp.value == 1.5  # the sheet still wins
        with Slide(slides.svs_025, "near", mpp_override=0.5):
            pass
    assert [
        r.getMessage()
        for r in caplog.records
        if "far" in r.getMessage() and "6.0x the file's own 0.25" in r.getMessage()
    ]
    assert not [r for r in caplog.records if "'near'" in r.getMessage()]


def test_without_the_tiatoolbox_extra_the_error_names_it(slides, tmp_path, monkeypatch, caplog):
    from slide_formats import write_ome_tiff

    from pathwsi.slides import backends

    monkeypatch.setattr(backends, "tiatoolbox_installed", lambda: False)
    ome = write_ome_tiff(slides.tiff_05, tmp_path / "section.ome.tif", 0.5)
    with pytest.raises(
        SlideError,
        match=r"backend tiatoolbox \(tiling.backend or the sheet's backend column\) needs the tiatoolbox extra: pip install -e '\.\[tiatoolbox\]'",
    ):
        Slide(ome, backend="tiatoolbox")
    with Slide(ome) as flat:  # auto without the extra: OpenSlide, which sees the first image only
        assert flat.backend == "openslide" and len(flat.levels) == 1
    assert "is an OME-TIFF: OpenSlide reads only its full-resolution image" in caplog.text
    series = tmp_path / "dicom"
    series.mkdir()
    (series / "frame.dcm").write_bytes(b"not really DICOM")
    with pytest.raises(SlideError, match=r"OpenSlide cannot open it.*For OME-TIFF or DICOM-WSI slides: pip install"):
        Slide(series)
