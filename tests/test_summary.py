"""The run summary: every slide with its status and timings; cohorts with slides used and left out."""

from __future__ import annotations

import json

import pandas as pd

from pathwsi.samples import Sample
from pathwsi.slides.tile_record import LevelZeroMpp, TileCounts, TilesRecord
from pathwsi.stain.macenko import StainFit, StainSettings, default_reference
from pathwsi.summary import build_summary, write_summary

SAMPLES = [
    {"cohort": "c1", "slide_id": s, "patient_id": p} for s, p in (("good", "p1"), ("blank", "p2"), ("broken", "p3"))
] + [{"cohort": "c2", "slide_id": "other", "patient_id": "p4"}]


def fit(status: str, reason: str | None = None) -> StainFit:
    reference = default_reference()
    return StainFit(reference, reference, status, reason, StainSettings(), 4, 1000, 800)


def record(slide: str, status: str, reason: str | None, **found) -> TilesRecord:
    sample = next(Sample(**s, path=f"{slide}.svs") for s in SAMPLES if s["slide_id"] == slide)
    return TilesRecord(sample, status, reason, {}, "test", **found)


def make_results(tmp_path):
    results = tmp_path / "results"
    for folder in ("tiles", "features", "aggregate/c1", "aggregate/c2"):
        (results / folder).mkdir(parents=True)
    ok = {"mpp": LevelZeroMpp(0.25, "openslide"), "stain": fit("fitted")}
    records = {
        "good": record("good", "ok", None, counts=TileCounts(60, 40), seconds=1.5, **ok),
        "blank": record(
            "blank", "no_tissue", "no tissue found on 2 mm²", seconds=0.7, stain=fit("fallback", "no tiles")
        ),
        "broken": record("broken", "failed", "slide 'broken': file is corrupt", seconds=0.1),
        "other": record("other", "ok", None, counts=TileCounts(10, 10), seconds=1.0, stain=fit("fitted")),
    }
    for slide, tiling in records.items():
        tiling.save(results / "tiles" / f"{slide}.json")
    (results / "features" / "good.timings.json").write_text(
        json.dumps(
            {
                "device": "cpu",
                "seconds": {
                    "read": 1.0,
                    "normalize": 0.5,
                    "model": 8.0,
                    "write": 0.1,
                    "total": 10.0,
                    "tiles_per_s": 4.0,
                },
            }
        )
    )
    (results / "aggregate" / "c1" / "slides.tsv").write_text(
        "slide_id\tpatient_id\tstatus\treason\tn_tiles\ngood\tp1\tused\t\t40\nblank\tp2\tleft_out\tno tiles (tiling status no_tissue: no tissue found)\t0\nbroken\tp3\tleft_out\tno tiles (tiling status failed)\t0\n"
    )
    (results / "aggregate" / "c2" / "slides.tsv").write_text(
        "slide_id\tpatient_id\tstatus\treason\tn_tiles\nother\tp4\tused\t\t10\n"
    )
    return results


def test_summary_lists_every_slide_with_reason_and_timings(tmp_path):
    slides, cohorts = build_summary(SAMPLES, make_results(tmp_path))
    slides = slides.set_index("slide_id")
    assert (
        slides.loc["good", "status"] == "ok"
        and slides.loc["good", "tiles"] == 40
        and slides.loc["good", "model_s"] == 8.0
    )
    assert slides.loc["broken", "status"] == "failed" and "corrupt" in slides.loc["broken", "reason"]
    assert slides.loc["blank", "aggregate"].startswith("left_out: no tiles")
    assert slides.loc["blank", "stain"] == "fallback (no tiles)"
    c1 = cohorts.set_index("cohort").loc["c1"]
    assert (c1.slides, c1.used, c1.left_out, c1.patients_used, c1.failed, c1.no_tissue) == (3, 1, 2, 1, 1, 1)


def test_written_summary_files(tmp_path):
    results = make_results(tmp_path)
    write_summary(SAMPLES, results, results / "summary.tsv", results / "summary_cohorts.tsv", results / "summary.md")
    assert len(pd.read_csv(results / "summary.tsv", sep="\t")) == 4
    markdown = (results / "summary.md").read_text()
    assert "| c1 | 3 | 1 | 2 | 1 | 40 | 1 | 0 | 1 |" in markdown
    assert "`broken` (c1): failed; slide 'broken': file is corrupt" in markdown
    assert "4.0 tiles/s" in markdown
    assert "<td>c1</td>" in (results / "summary.html").read_text()  # the report's page of it
    assert (
        "## Slides that failed, lost tiles or were left out: 2" in markdown
        and "`good`" not in markdown
        and "`other`" not in markdown
    )


def test_a_slide_with_unreadable_tiles_is_partial_and_named_with_its_tiles(tmp_path):
    results = make_results(tmp_path)
    record = {
        "device": "cpu",
        "seconds": {"total": 2.0, "tiles_per_s": 5.0},
        "unreadable_tiles": {
            "count": 2,
            "tiles": [
                {"index": 3, "x": 448, "y": 896, "reason": "JPEG tile 17 cannot be decoded"},
                {"index": 4, "x": 896, "y": 896, "reason": "JPEG tile 18 cannot be decoded"},
            ],
        },
    }
    (results / "features" / "other.timings.json").write_text(json.dumps(record))
    write_summary(SAMPLES, results, results / "summary.tsv", results / "summary_cohorts.tsv", results / "summary.md")
    row = pd.read_csv(results / "summary.tsv", sep="\t", keep_default_na=False).set_index("slide_id").loc["other"]
    assert row.status == "partial" and row.unreadable_tiles == 2
    markdown = (results / "summary.md").read_text()
    assert (
        "`other` (c2): partial; 2 of 10 tiles could not be read and are left out; level-0 (448, 896): JPEG tile 17 cannot be decoded, (896, 896)"
        in markdown
    )
    assert "| c2 | 1 | 1 | 0 | 1 | 10 | 0 | 1 | 0 |" in markdown


def test_text_tables_hold_six_significant_digits_not_float_noise(tmp_path):
    from pathwsi.runtime.outputs import write_frame

    write_frame(pd.DataFrame({"q": [0.9999999999999419, 0.123456789, 1e-12], "n": [1, 2, 3]}), tmp_path / "t.tsv")
    assert (tmp_path / "t.tsv").read_text().splitlines() == ["q\tn", "1\t1", "0.123457\t2", "1e-12\t3"]
