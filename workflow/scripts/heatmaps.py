"""Snakemake entry point of rule `heatmaps`: one cohort's tile models + stores -> tile scores and pictures."""

from pathlib import Path

from pathwsi.predict.aggregate import AggregateOutputs
from pathwsi.predict.heatmap_job import run_heatmap_job
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    slides = snakemake.params.slides
    run_heatmap_job(
        Path(snakemake.input.predict),
        AggregateOutputs(Path(snakemake.input.provenance).parent),
        dict(zip(slides, map(Path, snakemake.input.tiles))),
        dict(zip(slides, map(Path, snakemake.input.stores))),
        Path(snakemake.output[0]),
        expression_units=snakemake.params.expression_transform,
    )
