"""The per-slide tiling job: outputs, statuses, and failures that do not crash."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pathwsi.samples import Sample
from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide
from pathwsi.slides.tile_record import TilesRecord, TilesRecordError


def run(tmp_path, path, slide_id="s", mpp=None, settings=TilingJobSettings()):
    sample = Sample("c", slide_id, "p", str(path), mpp)
    outputs = TilingOutputs.under(tmp_path, slide_id)
    record = tile_slide(sample, settings, outputs)
    return record.to_json(), outputs


def test_outputs_follow_the_contract(tmp_path, slides):
    meta, out = run(tmp_path, slides.svs_025)
    table = pq.read_table(out.tiles).to_pandas()
    assert list(table.columns) == ["x", "y", "tissue_fraction"]
    assert table["x"].dtype == np.int64 and len(table) == meta["counts"]["kept"] > 0
    assert (table["tissue_fraction"] >= 0.5).all()
    on_disk = json.loads(out.meta.read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["status"] == "ok" and on_disk["mpp"] == {"value": 0.25, "source": "openslide-property (aperio)"}
    assert on_disk["tile"] == {"px": 224, "mpp": 0.5, "um": 112.0, "level0_px": 448.0}
    assert on_disk["read"]["level"] == 0 and on_disk["read"]["upsampled"] is False
    qc = Image.open(out.qc)
    assert max(qc.size) <= 1200 and qc.mode == "P"  # a 256-colour palette
    stain = on_disk["stain"]
    assert stain["status"] == "fitted" and stain["reason"] is None and stain["n_tiles"] == min(64, len(table))
    assert np.array(stain["params"]["stain_matrix"]).shape == (3, 2) and Image.open(out.stain_qc).width == 960
    assert not list(tmp_path.rglob("*.partial"))


def test_blank_slide_finishes_with_no_tissue(tmp_path, slides):
    meta, out = run(tmp_path, slides.blank)
    assert meta["status"] == "no_tissue" and "no tissue detected" in meta["reason"]
    assert pq.read_table(out.tiles).num_rows == 0 and out.qc.is_file() and out.stain_qc.is_file()
    assert meta["stain"]["status"] == "fallback" and meta["stain"]["reason"]


def test_stain_fit_is_seeded_per_slide(tmp_path, slides):
    from pathwsi.stain.macenko import StainSettings

    few = StainSettings(sample_tiles=5, min_od_pixels=100)
    first, _ = run(tmp_path / "a", slides.tiff_05, settings=TilingJobSettings(stain=few))
    second, _ = run(tmp_path / "b", slides.tiff_05, settings=TilingJobSettings(stain=few))
    reseeded, _ = run(tmp_path / "c", slides.tiff_05, settings=TilingJobSettings(stain=few, seed=1))
    assert first["stain"] == second["stain"] and first["stain"]["n_tiles"] == 5
    assert first["stain"]["params"] != reseeded["stain"]["params"]


@pytest.mark.parametrize(
    "name, reason", [("corrupt", "corrupt"), ("not_a_slide", "OpenSlide cannot open it"), ("no_mpp", "'mpp' column")]
)
def test_unusable_slides_are_recorded_as_failed(tmp_path, slides, name, reason):
    meta, out = run(tmp_path, getattr(slides, name), slide_id=name)
    assert meta["status"] == "failed" and reason in meta["reason"] and name in meta["reason"]
    assert pq.read_table(out.tiles).num_rows == 0
    assert json.loads(out.meta.read_text())["status"] == "failed" and out.qc.is_file() and out.stain_qc.is_file()


def test_sheet_mpp_rescues_a_slide_without_mpp(tmp_path, slides):
    meta, _ = run(tmp_path, slides.no_mpp, mpp=0.5)
    assert meta["status"] == "ok" and meta["mpp"]["source"] == "sample-sheet"


def test_tile_size_and_resolution_follow_the_settings(tmp_path, slides):
    from pathwsi.slides.grid import TileSettings

    settings = TilingJobSettings(tiling=TileSettings(tile_px=256, tile_mpp=1.0, min_tissue_fraction=0.25))
    meta, out = run(tmp_path, slides.svs_025, settings=settings)
    assert meta["tile"]["level0_px"] == 1024 and meta["read"]["level"] == 1
    xs = pq.read_table(out.tiles).column("x").to_numpy()
    assert (xs % 1024 == 0).all()


def test_cli_tiles_one_slide(tmp_path, slides):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathwsi.cli",
            "tile",
            str(slides.tiff_05),
            "--slide-id",
            "one",
            "--results",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "tiles" / "one.json").read_text())["status"] == "ok"


def test_tiling_job_does_not_import_torch(slides, tmp_path):
    code = (
        "import sys\nfrom pathwsi.samples import Sample\nfrom pathwsi.slides.tile_job import *\n"
        f"tile_slide(Sample('c','s','p',{str(slides.svs_025)!r}), TilingJobSettings(), TilingOutputs.under(__import__('pathlib').Path({str(tmp_path)!r}), 's'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_record_reads_back_through_its_class_and_refuses_another_schema(tmp_path, slides):
    meta, out = run(tmp_path, slides.svs_025)
    record = TilesRecord.load(out.meta)
    assert record.to_json() == json.loads(out.meta.read_text()) and record.tile.level0_px == meta["tile"]["level0_px"]
    assert record.stain.status == meta["stain"]["status"] and record.counts.kept == meta["counts"]["kept"]
    assert record.backend == "openslide"
    before_backends = {**meta, "slide": {k: v for k, v in meta["slide"].items() if k != "backend"}}
    out.meta.write_text(json.dumps(before_backends))  # a record of a release without backends: OpenSlide read it
    assert TilesRecord.load(out.meta).backend == "openslide"
    out.meta.write_text(json.dumps({**meta, "schema": "pathwsi.tiles/0"}))
    with pytest.raises(TilesRecordError, match=rf"{out.meta}: schema 'pathwsi.tiles/0'.*rerun"):
        TilesRecord.load(out.meta)
    out.meta.write_text(json.dumps({k: v for k, v in meta.items() if k != "sample"}))
    with pytest.raises(TilesRecordError, match=rf"{out.meta}: damaged \(KeyError"):
        TilesRecord.load(out.meta)


def test_a_stored_stain_fit_is_recorded_and_hashed_exactly_as_written(tmp_path, slides):
    """A fit whose 6-decimal record does not survive a re-serialisation (normalised columns, rounded again) must
    reach the store attrs and config hash as stored, or upgrading pathwsi would re-extract such slides."""
    from pathwsi.features.extract import ExtractSettings, store_attrs

    _, out = run(tmp_path, slides.svs_025)
    on_disk = json.loads(out.meta.read_text())
    on_disk["stain"]["params"] = {
        "stain_matrix": [[0.199555, 0.396806], [0.819875, 0.842825], [0.536639, 0.363582]],
        "max_conc": [1.081539, 1.5998],
    }
    record = TilesRecord.from_json(on_disk)
    assert record.stain.to_json()["params"] != on_disk["stain"]["params"]  # the round trip moves a digit
    assert record.to_json()["stain"] == on_disk["stain"]
    assert store_attrs(record.sample, record, [], ExtractSettings())["stain"]["params"] == on_disk["stain"]["params"]


def test_qc_pictures_of_a_demo_sized_slide_stay_small(tmp_path, slides):
    """The report embeds both pictures of every slide: 2.4 MB a slide made the demo's report 83 MB."""
    _, out = run(tmp_path, slides.svs_025)  # 0.9 x 0.7 mm, as small as the demo's slides
    sizes = out.qc.stat().st_size, out.stain_qc.stat().st_size
    assert sum(sizes) < 300_000, sizes  # before the palette and the size caps: 1.5 MB
    overview = Image.open(out.qc)
    assert overview.width == round(900 / (112 / 64))  # a 112 um tile is drawn 64 px wide, not 149 px
    colours = np.asarray(overview.convert("RGB")).reshape(-1, 3)
    assert (colours == (255, 255, 255)).all(axis=1).any() and (colours == (0, 0, 0)).all(axis=1).any()


def test_qc_pictures_carry_a_title_a_legend_and_a_scale_bar_in_mm():
    from PIL import Image

    from pathwsi.slides.qc import scale_bar, titled

    plain = Image.new("RGB", (1000, 400), "white")
    barred = np.asarray(scale_bar(plain, mpp=2.0))  # a fifth of 1000 px at 2 µm/px is 0.4 mm: the bar is 0.5 mm
    bar_rows = np.flatnonzero((barred[:, :, 0] == 0).sum(axis=1) >= 250)
    assert len(bar_rows) and (barred[bar_rows[0], :, 0] == 0).sum() == 251  # 0.5 mm = 250 px, both ends drawn
    framed = titled(plain, ["line 1", "line 2"], [((0, 0, 0), "tissue mask", True)])
    assert framed.height > plain.height + 2 * 14 and framed.width == plain.width
