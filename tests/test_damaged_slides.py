"""A slide whose tiles cannot all be decoded, met only by the features job, stops nothing: the batch
completes, the store records the tiles, aggregation leaves them out, and the summary names them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from workflow_project import TARGET, Row, make_project, snakemake

from pathwsi.features.store import open_store


@pytest.mark.slow
def test_a_damaged_tile_met_while_extracting_is_reported_and_the_run_completes(tmp_path, slides):
    rows = [
        Row("c1", "good", "p1", slides.svs_025),
        Row("c1", "damaged", "p2", slides.damaged_tiles),
        Row("c2", "other", "p3", slides.tiff_05),
    ]
    project = make_project(tmp_path / "project", rows, {"stain": {"sample_tiles": 4}})
    done = snakemake(project, "--cores", "2", TARGET)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (
        json.loads((project / "results" / "tiles" / "damaged.json").read_text())["status"] == "ok"
    )  # tiling did not meet them

    store = open_store(project / "results" / "features" / "damaged.zarr")
    unreadable = store.attrs["unreadable_tiles"]
    assert unreadable["count"] > 0 and "cannot be decoded" in unreadable["tiles"][0]["reason"]
    slides_used = pd.read_csv(
        project / "results" / "aggregate" / "c1" / "slides.tsv", sep="\t", keep_default_na=False
    ).set_index("slide_id")
    assert (
        slides_used.loc["damaged", "status"] == "used"
        and slides_used.loc["damaged", "n_tiles"] == store.attrs["n_tiles"] - unreadable["count"]
    )
    summary = pd.read_csv(project / "results" / "summary.tsv", sep="\t", keep_default_na=False).set_index("slide_id")
    assert (
        list(summary.status) == ["ok", "partial", "ok"]
        and summary.loc["damaged", "unreadable_tiles"] == unreadable["count"]
    )
    first = unreadable["tiles"][0]
    markdown = (project / "results" / "summary.md").read_text()
    assert (
        f"`damaged` (c1): partial; {unreadable['count']} of {store.attrs['n_tiles']} tiles could not be read"
        in markdown
    )
    assert f"({first['x']}, {first['y']}): {first['reason']}" in markdown
    assert "damaged: tile at level-0" in (project / "logs" / "features" / "damaged.log").read_text()


@pytest.mark.slow
def test_a_failing_jobs_error_and_traceback_are_in_its_own_log(tmp_path, slides):
    junk = tmp_path / "imgnet.safetensors"
    junk.write_bytes(b"not a weights file")
    backbones = {
        "imgnet": {"arch": "test_resnet", "weights": str(junk), "input_px": 64},
        "ftx": {"arch": "test_resnet", "weights": "untrained", "input_px": 64},
    }
    project = make_project(
        tmp_path / "project", [Row("c1", "s1", "p1", slides.tiff_05)], {"models": {"backbones": backbones}}
    )
    done = snakemake(project, "--cores", "1", "results/features/s1.zarr")
    assert done.returncode != 0
    log = (project / "logs" / "features" / "s1.log").read_text()
    assert (
        "ERROR pathwsi.job: the job failed: WeightsError: model 'imgnet': cannot read weights" in log
        and "Traceback (most recent call last)" in log
    )
