"""The run summary a user reads first: per slide, what happened and how long it took; per cohort,
which slides were used and which were left out (and why).

Reads only the small per-slide records the jobs wrote (`results/tiles/{slide}.json`,
`results/features/{slide}.timings.json`) and each cohort's `results/aggregate/{cohort}/slides.tsv`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pandas as pd

from pathwsi.runtime.outputs import write_frame, write_text
from pathwsi.runtime.report_page import write_markdown_page
from pathwsi.slides.tile_record import TilesRecord

SLIDE_COLUMNS = [
    "cohort",
    "slide_id",
    "patient_id",
    "status",
    "reason",
    "tiles",
    "unreadable_tiles",
    "mpp",
    "mpp_source",
    "stain",
    "aggregate",
    "tile_s",
    "features_s",
    "read_s",
    "normalize_s",
    "model_s",
    "write_s",
    "tiles_per_s",
    "device",
]


def slide_row(sample: dict[str, Any], tiles_meta: Path, timings: Path | None) -> dict[str, Any]:
    """One slide's line: tiling status and reason, tile count, µm/px, stain fit, seconds per stage."""
    tiling = TilesRecord.load(tiles_meta)
    stain = tiling.stain
    row: dict[str, Any] = {
        "cohort": sample["cohort"],
        "slide_id": sample["slide_id"],
        "patient_id": sample["patient_id"],
        "status": tiling.status,
        "reason": tiling.reason or "",
        "tiles": tiling.kept,
        "unreadable_tiles": 0,
        "mpp": tiling.mpp.value if tiling.mpp else None,
        "mpp_source": tiling.mpp.source if tiling.mpp else None,
        "stain": "" if stain is None else stain.status + (f" ({stain.reason})" if stain.reason else ""),
        "tile_s": tiling.seconds,
    }
    if timings is not None and timings.is_file():
        record = json.loads(timings.read_text())
        unreadable = record.get("unreadable_tiles") or {}
        if unreadable.get("count") and row["status"] == "ok":
            tiles = ", ".join(f"({t['x']}, {t['y']}): {t['reason']}" for t in unreadable["tiles"])
            row.update(
                status="partial",
                reason=f"{unreadable['count']} of {row['tiles']} tiles could not be read and are left out; level-0 {tiles}",
            )
        row["unreadable_tiles"] = unreadable.get("count", 0)
        seconds = record.get("seconds", {})
        row.update(
            features_s=seconds.get("total"),
            read_s=seconds.get("read"),
            normalize_s=seconds.get("normalize"),
            model_s=seconds.get("model"),
            write_s=seconds.get("write"),
            tiles_per_s=seconds.get("tiles_per_s"),
            device=record.get("device"),
        )
    return row


def build_summary(samples: list[dict[str, Any]], results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slide and per-cohort tables from the records under `results`."""
    rows = [
        slide_row(
            s, results / "tiles" / f"{s['slide_id']}.json", results / "features" / f"{s['slide_id']}.timings.json"
        )
        for s in samples
    ]
    slides = pd.DataFrame(rows).reindex(columns=SLIDE_COLUMNS)
    used = _aggregate_status(sorted({s["cohort"] for s in samples}), results)
    slides["aggregate"] = [used.get(sid, "") for sid in slides["slide_id"]]
    cohorts = (
        slides.groupby("cohort", sort=True)
        .agg(
            slides=("slide_id", "size"),
            used=("aggregate", lambda v: int((v == "used").sum())),
            left_out=("aggregate", lambda v: int((v != "used").sum())),
            patients_used=("patient_id", lambda p: int(p[slides.loc[p.index, "aggregate"] == "used"].nunique())),
            tiles=("tiles", "sum"),
            failed=("status", lambda v: int((v == "failed").sum())),
            partial=("status", lambda v: int((v == "partial").sum())),
            no_tissue=("status", lambda v: int((v == "no_tissue").sum())),
        )
        .reset_index()
    )
    return slides, cohorts


def _aggregate_status(cohorts: list[str], results: Path) -> dict[str, str]:
    """slide_id -> 'used' or 'left_out: reason', from each cohort's aggregate slides.tsv (when present)."""
    status: dict[str, str] = {}
    for cohort in cohorts:
        path = results / "aggregate" / cohort / "slides.tsv"
        if path.is_file():
            table = pd.read_csv(path, sep="\t", keep_default_na=False)
            status.update(
                {
                    cast(str, r.slide_id): "used" if r.status == "used" else f"left_out: {r.reason}"
                    for r in table.itertuples()
                }
            )
    return status


def summary_markdown(slides: pd.DataFrame, cohorts: pd.DataFrame) -> str:
    """A short human version: per cohort counts, then every slide that failed or was left out."""
    lines = [
        "# pathwsi run summary",
        "",
        "| cohort | slides | used | left out | patients used | tiles | failed | partial | no tissue |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c.cohort} | {c.slides} | {c.used} | {c.left_out} | {c.patients_used} | {c.tiles} | {c.failed} | {c.partial} | {c.no_tissue} |"
        for c in cohorts.itertuples()
    ]
    problems = slides[(slides["status"] != "ok") | (slides["aggregate"] != "used")]
    lines += ["", f"## Slides that failed, lost tiles or were left out: {len(problems)}", ""]
    lines += [
        f"- `{r.slide_id}` ({r.cohort}): {r.status}; {r.reason or r.aggregate!s}"
        for r in problems.itertuples(index=False)
    ] or ["none"]
    timed = slides.dropna(subset=["tiles_per_s"])
    if len(timed):
        lines += [
            "",
            f"Feature extraction: {int(timed.tiles.sum())} tiles in {timed.features_s.sum():.0f} s of job time "
            f"(median {timed.tiles_per_s.median():.1f} tiles/s per slide, device {', '.join(sorted(set(timed.device.dropna())))}).",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_summary(samples: list[dict[str, Any]], results: Path, out_tsv: Path, out_cohorts: Path, out_md: Path) -> None:
    """Write `summary.tsv` (per slide), `summary_cohorts.tsv`, `summary.md` and, beside it, `summary.html` (for the
    Snakemake report)."""
    slides, cohorts = build_summary(samples, results)
    write_frame(slides, out_tsv, sep="\t")
    write_frame(cohorts, out_cohorts, sep="\t")
    markdown = summary_markdown(slides, cohorts)
    write_text(markdown, out_md)
    write_markdown_page(markdown, "pathwsi run summary", out_md.with_suffix(".html"))
